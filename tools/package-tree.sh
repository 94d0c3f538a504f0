#!/usr/bin/env sh
# Mirror the source folders into DEST/deltastore as the wheel lays them out (pyproject's
# package-dir), so import-linter and mypy see one package tree: `codecs/` is `deltastore.codecs`,
# never the stdlib's `codecs`.
set -eu
dest=${1:?usage: tools/package-tree.sh DEST}
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$dest"
mkdir -p "$dest"
cp -R "$root/deltastore" "$dest/deltastore"
for folder in codecs server client bench integrations; do
    cp -R "$root/$folder" "$dest/deltastore/$folder"
done
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
