"""Bridges to other libraries, each an optional extra imported only on request:

    from nsa_dsl.integrations.transformers import convert   # pip install "nsa-dsl[hf]"

Importing nsa_dsl (or this package) imports none of them.
"""
