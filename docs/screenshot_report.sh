#!/usr/bin/env bash
# The demo model's report.html and a screenshot of it, docs/images/explain_report.png (shown in docs/explain.md).
# Run from the repository root; needs Chromium (Debian: apt-get install -y chromium).
#   bash docs/screenshot_report.sh          # trains runs/demo first when it is not there (a few minutes)
# RUN=<run dir> and OUT=<folder> change where the run is read and the report written.
set -euo pipefail
run=${RUN:-runs/demo}
out=${OUT:-$run/report}
picture=docs/images/explain_report.png
[ -d "$run/checkpoints" ] || python train.py --config configs/demo.py --workdir "$run"
python explain.py --evaluate --ckpt "$run" --auc-steps 4 --out "$out"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --screenshot="$out/report.png" \
  --window-size=1280,2000 "file://$(realpath "$out/report.html")" 2> "$out/chromium.log" \
  || { cat "$out/chromium.log"; exit 1; }  # (headless Chromium logs harmless D-Bus errors there)
# a 256-colour palette keeps the picture small enough for the docs
python -c "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').quantize(256).save(sys.argv[2], \
optimize=True)" "$out/report.png" "$picture"
echo "wrote $picture ($(du -k "$picture" | cut -f1) KB) from $out/report.html"
