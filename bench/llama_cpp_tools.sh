#!/usr/bin/env bash
# llama.cpp's own llama-imatrix and llama-quantize (the peers of bench_imatrix.py), built from the
# llama.cpp that the installed llama-cpp-python vendors (its sdist from the package index): the same
# code our quantizer calls. About 10 minutes on 2 cores, once. Prints the folder holding the tools.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/out/llama-cpp-tools}
if [ -x "$OUT/build/bin/llama-imatrix" ] && [ -x "$OUT/build/bin/llama-quantize" ]; then echo "$OUT/build/bin"; exit 0; fi
VERSION=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)")
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT" >&2
tar xzf "$OUT/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
SRC="$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$OUT/build" --target llama-imatrix llama-quantize -j "$(nproc)" >&2
echo "$OUT/build/bin"
