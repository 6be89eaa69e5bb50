# make setup: .venv with the project installed (editable) and pinned, Qt's system libraries, the default model.
# make test:  setup, then the linter and formatter checks (ruff), then the whole test suite on the CPU.
# make run:   setup, then kvstudio.
# make screenshots: setup, then the welcome, a model loading and each page at 800x600 and 1920x1080, light and
#             dark, into build/screenshots/ (offscreen, no network: tests/ui/screenshots.py).
# make readme-screenshots: setup, then the README's pictures (each page at 1280x800, light and dark) into
#             docs/screenshots/.
# make gpu-check: on a CUDA machine, the Triton kernels at real sizes and kvstudio against transformers there
#             (uses the machine's own python with torch, triton and transformers; no setup).
# make package: the desktop app as one folder, dist/kvstudio/ (PyInstaller, packaging/kvstudio.spec).
# make package-check: package, then start the bundle offscreen until its main window shows and run its command
#             line; prints the bundle's size and start-up time.
# make baseline: llama-cpp-python built from source into .venv (about 10 minutes on two cores), the baseline of
#             `kvstudio bench latency --baseline llama.cpp`.
# make wheel-check: build the wheel into dist/, install it in a fresh venv (build/wheel-check/venv) and run
#             kvstudio --help, doctor and generate on the default model from outside the repository.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Rebuilt only when what it was built from changes, so a second `make setup` takes about a second.
STAMP := $(VENV)/.kvstudio-setup

# PyPI's Linux torch wheel is the CUDA build. pip's find-links (/opt/wheels here) hold the CPU build, which wins
# a tie on the version, so where a GPU answers, pip is pointed at a folder without wheels instead.
# There torch's CUDA wheel also pins its own triton, so triton-cpu.txt's pin applies on the CPU only.
CONSTRAINTS := -c requirements/constraints.txt
ifeq ($(shell nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
PIP_ENV := PIP_FIND_LINKS=$(CURDIR)/requirements
else
CONSTRAINTS += -c requirements/triton-cpu.txt
endif

LDCONFIG := $(or $(shell command -v ldconfig 2>/dev/null),/sbin/ldconfig)
# soname:Debian package, for what Qt's offscreen and xcb platform plugins load.
QT_SYSTEM_LIBS := libEGL.so.1:libegl1 libGL.so.1:libgl1 libOpenGL.so.0:libopengl0 \
	libglib-2.0.so.0:libglib2.0-0 libfontconfig.so.1:libfontconfig1 libfreetype.so.6:libfreetype6 \
	libdbus-1.so.3:libdbus-1-3 libxkbcommon.so.0:libxkbcommon0 libxkbcommon-x11.so.0:libxkbcommon-x11-0 \
	libX11-xcb.so.1:libx11-xcb1 libxcb-cursor.so.0:libxcb-cursor0 libxcb-icccm.so.4:libxcb-icccm4 \
	libxcb-image.so.0:libxcb-image0 libxcb-keysyms.so.1:libxcb-keysyms1 libxcb-randr.so.0:libxcb-randr0 \
	libxcb-render.so.0:libxcb-render0 libxcb-render-util.so.0:libxcb-render-util0 libxcb-shape.so.0:libxcb-shape0 \
	libxcb-shm.so.0:libxcb-shm0 libxcb-sync.so.1:libxcb-sync1 libxcb-util.so.1:libxcb-util1 \
	libxcb-xfixes.so.0:libxcb-xfixes0 libxcb-xkb.so.1:libxcb-xkb1

.PHONY: setup test run screenshots readme-screenshots gpu-check baseline package package-check wheel-check

setup: $(STAMP)
	$(PY) -m app.library.model_store fetch-default
	@# Builds the C++ CPU kernels for this machine once (cached by torch afterwards).
	$(PY) -c "from kernels import cpu_ops; cpu_ops.load(); cpu_ops.load_quant(); cpu_ops.load_fused()"

# The editable install's compat mode puts the repository root on sys.path, so top-level packages added later
# (ui/, kernels/) import without a reinstall.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/triton-cpu.txt
	@missing=""; \
	for pair in $(QT_SYSTEM_LIBS); do \
		$(LDCONFIG) -p | awk '{print $$1}' | grep -qxF "$${pair%%:*}" || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Qt's system libraries:$$missing"; \
		if [ "$$(id -u)" -ne 0 ]; then echo "not root: run as root, or apt-get install$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install -q $(CONSTRAINTS) --config-settings editable_mode=compat -e '.[test]'
	QT_QPA_PLATFORM=offscreen $(PY) -c "from PySide6.QtWidgets import QApplication; QApplication([])"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest

run: setup
	$(VENV)/bin/kvstudio

screenshots: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m tests.ui.screenshots build/screenshots

readme-screenshots: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m tests.ui.screenshots --readme docs/screenshots

BASELINE_TOOLS := $(VENV)/.kvstudio-baseline
baseline: $(BASELINE_TOOLS)

# GGML_NATIVE: compiled for this machine's CPU (AVX2 and the like), as the desktop apps built on it ship it.
$(BASELINE_TOOLS): $(STAMP) requirements/baseline.txt requirements/constraints.txt
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q $(CONSTRAINTS) --no-binary llama-cpp-python \
		-r requirements/baseline.txt
	touch $@

GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m app.bench.gpu_check

# Build tools go into .venv beside the app, pinned by constraints.txt; a stamp per tool set, as for setup.
PACKAGE_TOOLS := $(VENV)/.kvstudio-package-tools
WHEEL_TOOLS := $(VENV)/.kvstudio-wheel-tools
BUNDLE := dist/kvstudio
# What the bundle is frozen from: it is rebuilt when one of these changes.
BUNDLE_SOURCES := $(shell find app engine kernels ui resources -type f ! -name '*.pyc' 2>/dev/null) \
	packaging/kvstudio.spec packaging/kvstudio_main.py pyproject.toml requirements/constraints.txt
WHEEL_CHECK := build/wheel-check

$(PACKAGE_TOOLS): $(STAMP) requirements/package.txt requirements/constraints.txt
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements/package.txt
	touch $@

$(WHEEL_TOOLS): $(STAMP) requirements/build.txt requirements/constraints.txt
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements/build.txt
	touch $@

$(BUNDLE)/kvstudio: $(PACKAGE_TOOLS) $(BUNDLE_SOURCES)
	$(PY) -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
		packaging/kvstudio.spec
	touch $@

package: $(BUNDLE)/kvstudio

# setup first: the check runs the bundle on the default model it fetches.
package-check: setup package
	$(PY) packaging/check_bundle.py $(BUNDLE)

# build/lib is removed first: setuptools copies modules there and never deletes one the source tree lost.
wheel-check: $(WHEEL_TOOLS)
	rm -rf build/lib $(WHEEL_CHECK) dist/kvstudio-*.whl
	$(PY) -m build --wheel --outdir dist .
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(PIP_ENV) $(WHEEL_CHECK)/venv/bin/pip install -q $(CONSTRAINTS) dist/kvstudio-*.whl
	$(PY) packaging/check_wheel.py $(WHEEL_CHECK)/venv dist/kvstudio-*.whl
