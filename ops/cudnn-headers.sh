#!/usr/bin/env bash
# Headers for the `cudnn` cargo feature (cuDNN fused attention): cudnn.h from the
# nvidia-cudnn-cu13 wheel and the header-only cuDNN frontend from nvidia-cudnn-frontend, both
# pinned. Only the include folders are kept (in $VJEPA_CUDNN_HEADERS, default
# ~/.cache/vjepa-cudnn-headers); no library is linked: the binary opens libcudnn.so.9 at run
# time. Prints the exports, so use it as
#   eval "$(ops/cudnn-headers.sh)"
# after ../shared/tools/cuda-env.sh. Not needed by the job or by CI.
set -euo pipefail
CUDNN_WHEEL_VERSION=9.28.1.4
FRONTEND_VERSION=1.32.0
DEST=${VJEPA_CUDNN_HEADERS:-$HOME/.cache/vjepa-cudnn-headers}
STAMP="$DEST/.versions"
WANT="cudnn $CUDNN_WHEEL_VERSION frontend $FRONTEND_VERSION layout 2"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "cudnn-headers: fetching nvidia-cudnn-cu13==$CUDNN_WHEEL_VERSION and nvidia-cudnn-frontend==$FRONTEND_VERSION (~530 MB download, ~3 MB kept)" >&2
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$TMP" \
    "nvidia-cudnn-cu13==$CUDNN_WHEEL_VERSION" "nvidia-cudnn-frontend==$FRONTEND_VERSION" >&2
  rm -rf "$DEST" && mkdir -p "$DEST"
  python3 - "$TMP" "$DEST" <<'PY'
import pathlib, sys, zipfile
tmp, dest = map(pathlib.Path, sys.argv[1:])
# The frontend's headers include each other as "../include/…": keep their folder's name.
for wheel, prefix, out in [("nvidia_cudnn_cu13", "nvidia/cudnn/include/", "cudnn"),
                           ("nvidia_cudnn_frontend", "include/", "frontend/include")]:
    (path,) = tmp.glob(wheel + "-*.whl")
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = dest / out / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
PY
  test -f "$DEST/cudnn/cudnn.h" && test -f "$DEST/frontend/include/cudnn_frontend.h"
  echo "$WANT" > "$STAMP"
fi
echo "export CUDNN_INCLUDE=\"$DEST/cudnn\" CUDNN_FRONTEND_INCLUDE=\"$DEST/frontend/include\""
