"""coldbrew.imagebuild: images defined in Python, built step by step in coldbrew containers into the chunk store.

    from coldbrew.imagebuild import Image
    image = Image.debian_slim(python="3.11").apt_install("jq").pip_install("six").workdir("/app")
    result = image.build(store="/var/lib/coldbrew/store", progress=True)
    result.reference   # what `coldbrew fs mount`, `coldbrew image bundle` and `coldbrew run` take

Names are imported on first use (the `coldbrew` command line imports this package and must stay light).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Image": "image", "Step": "image", "ImageBuildError": "image", "ImageDefinitionError": "image",
    "build_image": "build", "BuildResult": "build", "StepResult": "build", "BuildError": "build",
    "RegistryAccess": "build", "Reporter": "build", "DedupeReport": "build", "dedupe_report": "build",
    "image_config": "build", "make_bundle": "build", "remove_bundle": "build", "resolve_image": "build",
    "StepCache": "cache", "StepRecord": "cache", "ImageRecord": "cache",
    "ImageConfig": "oci", "ImageImportError": "oci", "import_oci": "oci",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coldbrew.imagebuild' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
