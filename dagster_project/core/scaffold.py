"""`release new PRODUCT`: a new product folder from the scaffold, valid and deployable as is.

The template (`dagster_project/scaffold/template/`, files ending in `.tmpl`) holds a spec, a
first migration, an expectation suite, a minimal service (API and worker) and a contract.
`{{product}}` and `{{token_sha256}}` are filled in; the product's guardrail token is made here
and returned once to the caller, which shows it once: only its SHA-256 is written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dagster_project.core import guardrail
from dagster_project.core.knobs import quote
from dagster_project.core.settings import PRODUCTS_ENV, products_dir
from dagster_project.core.spec import PRODUCT_ID_RE, SpecError, load_spec

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "scaffold" / "template"
SUFFIX = ".tmpl"


class ScaffoldRefused(ValueError):
    """The product id or the target folder is not usable; the message names it."""


@dataclass(frozen=True)
class NewProduct:
    product: str
    path: Path
    files: list[str]
    token: str  # shown once by the caller; never written anywhere

    @property
    def token_sha256(self) -> str:
        return guardrail.fingerprint(self.token)


def new_token() -> str:
    """A fresh guardrail token (192 random bits, URL-safe)."""
    return "grd-" + secrets.token_urlsafe(24)


def render(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def create_product(product: str, root: Path | None = None) -> NewProduct:
    """Write the folder `<root or products_dir()>/<product>` from the template; the folder
    appears whole or not at all (written beside it, then renamed). Raises ScaffoldRefused."""
    if not isinstance(product, str) or not PRODUCT_ID_RE.fullmatch(product):
        raise ScaffoldRefused(
            f"PRODUCT {quote(product)} is refused: expected 1-63 lowercase letters, digits and "
            "'-', starting with a letter or digit (it names the folder and the databases)"
        )
    base = root or products_dir()
    target = base / product
    if target.exists():
        raise ScaffoldRefused(
            f"PRODUCT {product!r}: {target} already exists; choose another name or remove it"
        )
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScaffoldRefused(
            f"{PRODUCTS_ENV}: cannot create the products directory {base}: {exc.strerror or exc}"
        ) from None
    token = new_token()
    values = {"product": product, "token_sha256": guardrail.fingerprint(token)}
    written: list[str] = []
    partial = Path(tempfile.mkdtemp(prefix=f".{product}.", suffix=".partial", dir=base))
    try:
        for source in sorted(TEMPLATE_DIR.rglob(f"*{SUFFIX}")):
            relative = source.relative_to(TEMPLATE_DIR).with_suffix("")  # drops `.tmpl`
            destination = partial / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(render(source.read_text(encoding="utf-8"), values))
            written.append(relative.as_posix())
        partial.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(partial, target)
        except OSError as exc:
            raise ScaffoldRefused(f"PRODUCT {product!r}: cannot create {target}: {exc}") from None
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    try:
        load_spec(target / "product.yaml")  # the scaffold's own check: it must load as written
    except SpecError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return NewProduct(product=product, path=target, files=written, token=token)
