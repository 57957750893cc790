#!/usr/bin/env bash
# Build machine (Debian 12, no GPU needed): a GStreamer kit for a GPU machine that has none, so
# bench/gpu-pipeline.sh and bench/loss-trend.sh can decode there. It holds the plugins the job
# decodes with and make-samples encodes with, the shared libraries they need beyond glibc and
# libstdc++, and gst-plugin-scanner; bench/gpu-session.sh unpacks it and points GStreamer at it.
#
# libav: Debian's libavcodec/libavformat/libavfilter need 169 libraries (224 MB: x265, codec2,
# SVT-AV1, ICU, flite, …), over the device tool's 64 MiB carry. This builds the FFmpeg release
# the installed libavcodec comes from (same ABI, so Debian's gst-libav loads it) with only the
# decoders the benchmarks read — H.264, H.265, VP9, with their x86 assembly (nasm) — and no
# external library. Decode speed is FFmpeg's own for those codecs; nothing else is in it.
#   bench/gst-kit.sh [OUT_TAR]            (default .carry/gst.tar.xz)
# Environment: KIT_WORK (build folder, default target/gst-kit; the FFmpeg build is kept there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_TAR="${1:-.carry/gst.tar.xz}"
WORK="$(mkdir -p "${KIT_WORK:-target/gst-kit}" && cd "${KIT_WORK:-target/gst-kit}" && pwd)"
ops/apt-install.sh gst-kit gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav nasm curl xz-utils \
  build-essential >/dev/null
ARCH_LIB=/usr/lib/x86_64-linux-gnu
PLUGINS="$ARCH_LIB/gstreamer-1.0"
SCANNER="$ARCH_LIB/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"

# 1. FFmpeg, the installed libavcodec59's upstream release, from Debian's archive (checked
#    against the sha256 the source package's .dsc lists).
deb_version=$(dpkg-query -W -f='${Version}' libavcodec59)      # e.g. 7:5.1.9-0+deb12u1
upstream=${deb_version#*:}; upstream=${upstream%%-*}             # 5.1.9
FF="$WORK/ffmpeg-$upstream"
PREFIX="$WORK/ffmpeg-$upstream-prefix"
if [ ! -e "$PREFIX/lib/libavcodec.so.59" ]; then
  dsc="ffmpeg_${deb_version#*:}.dsc"
  tarball="ffmpeg_${upstream}.orig.tar.xz"
  for base in https://deb.debian.org/debian-security/pool/updates/main/f/ffmpeg \
              https://deb.debian.org/debian/pool/main/f/ffmpeg; do
    curl -fsSL -o "$WORK/$dsc" "$base/$dsc" && curl -fsSL -o "$WORK/$tarball" "$base/$tarball" && break
  done
  [ -s "$WORK/$tarball" ] || { echo "gst-kit: cannot download $tarball" >&2; exit 1; }
  want=$(awk '/^Checksums-Sha256:/{f=1; next} /^[^ ]/{f=0} f && $3 == "'"$tarball"'" {print $1}' "$WORK/$dsc")
  have=$(sha256sum "$WORK/$tarball" | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$have" ] || { echo "gst-kit: $tarball sha256 $have, .dsc says '$want'" >&2; exit 1; }
  rm -rf "$FF" && tar -C "$WORK" -xJf "$WORK/$tarball"
  [ -d "$FF" ] || mv "$WORK"/ffmpeg-"${upstream}"* "$FF" 2>/dev/null || true
  echo "gst-kit: building FFmpeg $upstream (h264, hevc, vp9 decoders) ..." >&2
  (cd "$FF" && ./configure --prefix="$PREFIX" --enable-shared --disable-static \
      --disable-programs --disable-doc --disable-autodetect --disable-everything \
      --enable-decoder=h264,hevc,vp9 --enable-parser=h264,hevc,vp9 \
      --enable-swscale --enable-swresample --enable-avfilter --enable-avformat \
      --extra-version=vjepa-kit > "$WORK/ffmpeg-configure.log" \
    && make -j"$(nproc)" > "$WORK/ffmpeg-build.log" 2>&1 && make install >> "$WORK/ffmpeg-build.log" 2>&1) \
    || { echo "gst-kit: FFmpeg build failed; see $WORK/ffmpeg-*.log" >&2; exit 1; }
fi

# 2. The kit: plugins, their libraries (the FFmpeg build's libav instead of Debian's), scanner.
KIT="$WORK/kit/gst"
rm -rf "$WORK/kit" && mkdir -p "$KIT/plugins" "$KIT/lib" "$KIT/libexec"
# decodebin (playback), typefind, appsrc/appsink, videoconvert/scale, capsfilter/queue/fakesink/
# filesink (coreelements), qtdemux/mp4mux (isomp4), matroskademux/webmmux, h264/h265/vp9parse
# (videoparsersbad), avdec_* (libav), make-samples' x264enc/vp9enc/videotestsrc, NVDEC (nvcodec:
# it opens the driver's libnvcuvid at run time).
for p in coreelements typefindfunctions app playback videoconvertscale videotestsrc isomp4 \
         matroska videoparsersbad libav x264 vpx nvcodec; do
  cp -L "$PLUGINS/libgst$p.so" "$KIT/plugins/"
done
cp -L "$SCANNER" "$KIT/libexec/"
cp -L "$PREFIX"/lib/lib{avcodec.so.59,avformat.so.59,avfilter.so.8,avutil.so.57,swscale.so.6,swresample.so.4} "$KIT/lib/"
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libgcc_s|libstdc\+\+|libav|libsw)'
LD_LIBRARY_PATH="$PREFIX/lib" ldd "$KIT"/plugins/*.so "$KIT/libexec/gst-plugin-scanner" \
  | awk '$3 ~ /^\// {print $1, $3}' | sort -u | while read -r name path; do
  [[ "$name" =~ $skip ]] || cp -L "$path" "$KIT/lib/$name"
done
# Every library the kit's files need must now resolve inside the kit (or to glibc/libstdc++).
unresolved=$(LD_LIBRARY_PATH="$KIT/lib" ldd "$KIT"/plugins/*.so "$KIT"/lib/*.so* "$KIT/libexec/gst-plugin-scanner" \
  | awk '$3 ~ /^\// {print $1, $3}' | grep -vE "$KIT/lib/| /(usr/)?lib(64)?/(x86_64-linux-gnu/)?(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux)" || true)
[ -z "$unresolved" ] || { echo "gst-kit: resolved outside the kit:" >&2; echo "$unresolved" >&2; exit 1; }
mkdir -p "$(dirname "$OUT_TAR")"
tar -C "$WORK/kit" -cf - gst | xz -6 -T0 > "$OUT_TAR"
echo "gst-kit: $(ls "$KIT/plugins" | wc -l) plugins, $(ls "$KIT/lib" | wc -l) libraries, $(du -sh "$KIT" | cut -f1) → $OUT_TAR $(du -h "$OUT_TAR" | cut -f1)" >&2
