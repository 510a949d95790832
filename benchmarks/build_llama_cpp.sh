#!/usr/bin/env bash
# Build llama.cpp's own runtimes (llama-bench, llama-batched-bench, llama-server) from the sources that
# llama-cpp-python vendors, so benchmarks/decode.py --llama-bench and benchmarks/serve.py --llama-server measure
# llama.cpp itself, with no Python in its loop, at the version the binding-based figures used.
#
#   bash benchmarks/build_llama_cpp.sh            # -> ~/.cache/nanoseek/llama.cpp-0.3.36/bin/
#   bash benchmarks/build_llama_cpp.sh DIR        # build into DIR instead
#   FORCE=1 JOBS=2 bash benchmarks/build_llama_cpp.sh
#
# Idempotent: a finished build for the same flags and CPU is reused (prints the bin dir and exits). The binaries
# are static (no shared libs to find) and built with GGML_NATIVE=ON, i.e. for this CPU only: the stamp file records
# the CPU model, and a different CPU rebuilds. Needs cmake >= 3.14, a C++17 compiler, pip (to fetch the sdist).
# On a shared machine run it as `nice -n 19 bash benchmarks/build_llama_cpp.sh`.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PREFIX="${1:-${NANOSEEK_CACHE:-$HOME/.cache/nanoseek}/llama.cpp-$VERSION}"
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama-bench llama-batched-bench llama-server)
FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON           # this CPU's SIMD, as a user building llama.cpp gets
  -DBUILD_SHARED_LIBS=OFF    # self-contained binaries: copied into bin/ without an rpath to keep
  -DLLAMA_CURL=OFF           # older trees: no model downloads (ignored where the option is gone)
  -DLLAMA_OPENSSL=OFF        # no HTTPS in llama-server: it serves 127.0.0.1
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF  # no web UI and nothing fetched at build time
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
)
cpu="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || uname -m)"
stamp="llama-cpp-python $VERSION | ${FLAGS[*]} | $cpu"

if [[ -z "${FORCE:-}" && -f "$PREFIX/bin/STAMP" && "$(cat "$PREFIX/bin/STAMP")" == "$stamp" ]]; then
  ok=1
  for t in "${TARGETS[@]}"; do [[ -x "$PREFIX/bin/$t" ]] || ok=0; done
  if [[ $ok == 1 ]]; then
    echo "already built: $PREFIX/bin"
    exit 0
  fi
fi

start=$SECONDS
mkdir -p "$PREFIX/src"
sdist="$PREFIX/src/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
  echo "== fetching the llama-cpp-python $VERSION sdist"
  python -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$PREFIX/src"
fi
tree="$PREFIX/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$tree/CMakeLists.txt" ]]; then
  tar -xzf "$sdist" -C "$PREFIX/src"
fi
[[ -f "$tree/CMakeLists.txt" ]] || { echo "no vendored llama.cpp in $sdist (expected vendor/llama.cpp)" >&2; exit 1; }

echo "== configuring ($tree)"
cmake -S "$tree" -B "$PREFIX/build" -Wno-dev "${FLAGS[@]}" >"$PREFIX/cmake-configure.log" 2>&1 \
  || { tail -30 "$PREFIX/cmake-configure.log" >&2; exit 1; }
echo "== building ${TARGETS[*]} with $JOBS jobs (log: $PREFIX/cmake-build.log)"
cmake --build "$PREFIX/build" --target "${TARGETS[@]}" -j "$JOBS" >"$PREFIX/cmake-build.log" 2>&1 \
  || { tail -30 "$PREFIX/cmake-build.log" >&2; exit 1; }

mkdir -p "$PREFIX/bin"
for t in "${TARGETS[@]}"; do
  cp "$PREFIX/build/bin/$t" "$PREFIX/bin/$t"
done
echo "$stamp" >"$PREFIX/bin/STAMP"
echo "built in $((SECONDS - start)) s: $PREFIX/bin"
"$PREFIX/bin/llama-bench" --help >/dev/null 2>&1 || echo "warning: $PREFIX/bin/llama-bench --help failed" >&2
