"""The product scaffold: `release new PRODUCT` copies `template/` into a new product folder,
filling in `{{product}}` and `{{token_sha256}}` (dagster_project/core/scaffold.py). The files
end in `.tmpl` so they are data here, not code of this package."""
