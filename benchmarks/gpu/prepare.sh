#!/usr/bin/env bash
# Downloads, here (with network), the wheels an offline CUDA box lacks, for CPython 3.12 manylinux x86_64, into
# a folder (default .whl/, git-ignored) to carry there with the repo:
#
#   benchmarks/gpu/prepare.sh [FOLDER] [NAME==VERSION ...]
#
# With no packages named: the versions installed in this environment of the packages sdxl-split needs that a
# stock PyTorch CUDA image does not ship (diffusers and what it adds, pyzmq, platformdirs; FastAPI, uvicorn and
# pydantic with what they add, and the typing_extensions and anyio they want, for the serve row), so the box
# runs exactly what was tested here. torchao (--quantize) comes as its pure-Python wheel, without CUDA extensions
# built for another torch; the suite drops it if it does not import there. The folder must stay under 60 MiB to
# travel with the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
folder="${1:-.whl}"
shift || true
if [ "$#" -eq 0 ]; then
  mapfile -t packages < <(python3 - <<'PY'
from importlib.metadata import version
for name in ("diffusers", "importlib_metadata", "pyzmq", "platformdirs", "torchao", "fastapi", "starlette", "uvicorn",
             "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "opentelemetry_api",
             "annotated_doc", "typing_extensions", "anyio"):
    print(f"{name}=={version(name)}")
PY
)
else
  packages=("$@")
fi
mkdir -p "$folder"
binary=() pure=()
for package in "${packages[@]}"; do
  case "$package" in torchao*) pure+=("$package") ;; *) binary+=("$package") ;; esac
done
if [ "${#binary[@]}" -gt 0 ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$folder" "${binary[@]}"
fi
if [ "${#pure[@]}" -gt 0 ]; then
  rm -f "$folder"/torchao-*-cp*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
    -d "$folder" "${pure[@]}"
fi
size_kib=$(du -sk "$folder" | cut -f1)
echo "${packages[*]} -> $folder ($((size_kib / 1024)) MiB)"
if [ "$size_kib" -gt $((60 * 1024)) ]; then
  echo "error: $folder is over 60 MiB; remove old wheels from it" >&2
  exit 1
fi
