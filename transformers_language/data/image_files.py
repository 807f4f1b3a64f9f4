"""What a local image folder holds, checked before a run loads anything: its class sub-folders (each must hold
images: `imagefolder` drops an empty class and numbers the rest without it, so every later label would shift) and
its image files (each must open as an image: a zero-byte file, a text file named `.png` or a truncated PNG would
otherwise end a run in a traceback at the step that first draws it). Broken files are named in one error, or
skipped with a warning and a count (`--skip_broken_images`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputFileError

logger = logging.getLogger(__name__)


def folder_classes(folder: str) -> list[str]:
    """The class names of an image folder: its sub-folders, sorted (as `imagefolder` numbers them)."""
    return sorted(child.name for child in Path(folder).iterdir() if child.is_dir())


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def image_files(folder: str, classes: list[str]) -> dict[str, list[Path]]:
    """Each class's image files (by suffix, as `imagefolder` selects them)."""
    suffixes = _image_suffixes()
    return {
        name: sorted(path for path in (Path(folder) / name).rglob("*") if path.suffix.lower() in suffixes)
        for name in classes
    }


def _opens(path: Path) -> bool:
    """Whether `path` opens as an image and its data checks out (PIL's verify: headers, PNG chunk checksums)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return False
    return True


def check_image_folder(folder: str, flag: str, classes: list[str], skip_broken: bool) -> tuple[str, ...]:
    """One line for an empty class folder or a broken image file (naming it and the fix); with `skip_broken`, the
    broken files (resolved paths) to leave out, each named in a warning."""
    files = image_files(folder, classes)
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise InputFileError(
            f"{flag} {folder}: the class folder(s) {', '.join(empty[:5])} hold no images; imagefolder would drop "
            "them and shift every later class's label. Add their images or remove the empty folders (from every "
            "split)."
        )
    broken = [path for paths in files.values() for path in paths if not _opens(path)]
    if broken and not skip_broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise InputFileError(
            f"{flag} {folder}: {broken[0]}{more} cannot be read as an image (empty, truncated or not an image); "
            "replace or remove it, or pass --skip_broken_images to leave such files out."
        )
    for path in broken:
        logger.warning("Skipping %s: it cannot be read as an image", path)
    if broken:
        logger.warning("Skipped %d broken image file(s) in %s", len(broken), folder)
    return tuple(str(path.resolve()) for path in broken)


def decoded(transform, image):
    """`transform(image)`, with an image that fails to decode named (its file) in one error."""
    try:
        return transform(image)
    except OSError as error:
        name = getattr(image, "filename", None) or "an image"
        raise InputFileError(
            f"{name} cannot be decoded ({error}); replace or remove it, or pass --skip_broken_images."
        ) from error
