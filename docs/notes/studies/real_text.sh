#!/usr/bin/env bash
# Real English text of several kinds, none of it legal prose, for `cqil-fx recover --text` and
# `cqil-fx correct --text`: Debian's fortune cookies (quotes, jokes, literature, songs, science,
# without the `law`, `disclaimer` and `ascii-art` files), Ambrose Bierce's The Devil's Dictionary
# and the Jargon File (dictd's gzip-compressed `.dz` files, read as they are).
#
#     bash docs/notes/studies/real_text.sh DIR        # DIR/fortunes/, DIR/devil.dict.dz, DIR/jargon.dict.dz
#
# Needs `apt-get download` (a Debian-based machine that reaches its package archive) and `dpkg -x`;
# installs nothing. The held-out licence texts (docs/results/quality.md) are another kind of text, and
# `text_file_windows` refuses any file that shares a run of 12 words with them.
set -euo pipefail
out=${1:?usage: bash docs/notes/studies/real_text.sh DIR}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q fortunes fortunes-min dict-devil dict-jargon >/dev/null 2>&1) \
    || { echo "apt-get download failed: no Debian package archive here?" >&2; exit 1; }
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
mkdir -p "$out/fortunes"
for f in "$work"/root/usr/share/games/fortunes/*; do
    name=$(basename "$f")
    case "$name" in *.dat|*.u8|law|disclaimer|ascii-art) continue ;; esac
    cp "$f" "$out/fortunes/"
done
cp "$work"/root/usr/share/dictd/devil.dict.dz "$work"/root/usr/share/dictd/jargon.dict.dz "$out/"
(cd "$out" && find . -type f | sort | xargs sha256sum | sha256sum | sed 's/ .*/  (sha256 of the files)/')
du -sh "$out"
