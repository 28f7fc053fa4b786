#!/usr/bin/env bash
# flash_nsa's package (github.com/mdy666/Scalable-Flash-Native-Sparse-Attention,
# Apache-2.0), to benchmark beside nsa_dsl on the GPU machine (no network
# there): copies flash_nsa/ from a git checkout or mirror of that repository
# into .flash_nsa/ (ignored), which a device call carries:
#   bash benchmarks/fetch_flash_nsa.sh /path/to/its/git/dir
#   run: carry [".device", ".flash_nsa"]; gpu_session.sh decode finds it.
set -euo pipefail
src=${1:?usage: fetch_flash_nsa.sh GIT_DIR}
rm -rf .flash_nsa && mkdir -p .flash_nsa
git -C "$src" archive HEAD flash_nsa | tar -x -C .flash_nsa
git -C "$src" rev-parse HEAD > .flash_nsa/COMMIT
echo "flash_nsa $(cat .flash_nsa/COMMIT) -> .flash_nsa/flash_nsa"
