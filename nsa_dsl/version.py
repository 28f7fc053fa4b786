"""The package version: a leaf, so that modules which stamp it (the cache
key, the generated file's header) need not import the package itself."""
__version__ = "0.1.0"
