"""Installs ``medfoundry-lm-eval.pth`` into site-packages with the package (everything else is in pyproject.toml).

The .pth file imports ``medfoundry_lm_eval_hook`` at interpreter start, which registers the ``medfoundry`` model
with lm-evaluation-harness (that has no plugin entry points for models). A .pth file must sit at the root of
site-packages, where no package data goes, so it is copied there by ``build_py``: into ``build_lib`` for a wheel
(``pip install .``), and into the wheel being built for an editable install (``pip install -e .``), whose
``build_lib`` setuptools throws away.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).parent / "src" / "medfoundry-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(PTH), str(Path(root) / PTH.name), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithPth})
