//! Which video decoders `decodebin` may plug: software only (the default, the same frames on
//! every machine), or NVIDIA's NVDEC through GStreamer's `nvcodec` elements (`nvh264dec`,
//! `nvh265dec`, `nvvp9dec`, …) so that a GPU machine's CPU cores are not the ingest's limit.
//!
//! The choice is made per decoder in decodebin's `autoplug-select` signal rather than by
//! changing element ranks, which are process-wide: two decoders in one process may differ.

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use std::fmt;
use std::str::FromStr;

use crate::IngestError;

/// The decoder family a [`crate::Decoder`] uses for video streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VideoDecoderKind {
    /// Software decoders only (libav, libvpx, …); hardware decoders are skipped even where a
    /// machine has them, so a corpus decodes to the same frames everywhere.
    #[default]
    Software,
    /// NVDEC (`nvcodec` plugin) for every stream one of its decoders accepts; software for the
    /// codecs NVDEC lacks. Frames are downloaded to system memory (what `videoconvert` takes).
    Nvdec,
}

impl VideoDecoderKind {
    /// Every accepted spelling, for error messages.
    pub const NAMES: &'static str = "software, nvdec";
}

impl fmt::Display for VideoDecoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VideoDecoderKind::Software => "software",
            VideoDecoderKind::Nvdec => "nvdec",
        })
    }
}

impl FromStr for VideoDecoderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "software" => Ok(VideoDecoderKind::Software),
            "nvdec" => Ok(VideoDecoderKind::Nvdec),
            other => Err(format!(
                "unknown video decoder {other:?} (expected one of: {})",
                Self::NAMES
            )),
        }
    }
}

/// Names of the NVDEC video decoders registered in this process (empty without the `nvcodec`
/// plugin, or where it found no NVIDIA driver/GPU: it registers its elements only then).
pub fn nvdec_decoders() -> Result<Vec<String>, IngestError> {
    crate::init()?;
    let mut names: Vec<String> = nvdec_factories()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    names.sort();
    Ok(names)
}

/// Checks that `kind` can run here: NVDEC needs at least one registered `nvcodec` decoder.
pub fn check_available(kind: VideoDecoderKind) -> Result<(), IngestError> {
    crate::init()?;
    if kind == VideoDecoderKind::Nvdec && nvdec_factories().is_empty() {
        return Err(IngestError::Fatal(
            "no NVDEC decoder is registered: GStreamer's nvcodec plugin (gstreamer1.0-plugins-bad) \
             registers nvh264dec & co. only where it finds an NVIDIA driver and GPU"
                .into(),
        ));
    }
    Ok(())
}

fn nvdec_factories() -> Vec<gst::ElementFactory> {
    gst::ElementFactory::factories_with_type(
        gst::ElementFactoryType::DECODER | gst::ElementFactoryType::MEDIA_VIDEO,
        gst::Rank::NONE,
    )
    .into_iter()
    .filter(|f| is_nvdec(&f.name(), f.plugin_name().as_deref()))
    .collect()
}

fn is_nvdec(factory: &str, plugin: Option<&str>) -> bool {
    plugin == Some("nvcodec") || (factory.starts_with("nv") && factory.ends_with("dec"))
}

/// What `autoplug-select` answers for one candidate factory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Select {
    /// Plug it (decodebin tries the candidates in rank order).
    Try,
    /// Leave it out.
    Skip,
}

/// The candidate as decodebin offers it.
pub(crate) struct Candidate<'a> {
    pub factory: &'a str,
    pub klass: &'a str,
    pub plugin: Option<&'a str>,
}

/// The rule: demuxers, parsers and everything else pass; among video decoders, `kind` decides.
/// `nvdec_takes_stream` says whether some NVDEC decoder accepts the stream's caps, so that NVDEC
/// mode falls back to software for codecs NVDEC lacks instead of refusing them.
pub(crate) fn select(
    kind: VideoDecoderKind,
    c: &Candidate<'_>,
    nvdec_takes_stream: bool,
) -> Select {
    if !c.klass.contains("Decoder") {
        return Select::Try;
    }
    let nvdec = is_nvdec(c.factory, c.plugin);
    let hardware = nvdec || c.klass.contains("Hardware");
    match kind {
        VideoDecoderKind::Software if hardware => Select::Skip,
        VideoDecoderKind::Software => Select::Try,
        VideoDecoderKind::Nvdec if nvdec => Select::Try,
        VideoDecoderKind::Nvdec if hardware => Select::Skip,
        VideoDecoderKind::Nvdec if nvdec_takes_stream && c.klass.contains("Video") => Select::Skip,
        VideoDecoderKind::Nvdec => Select::Try,
    }
}

/// Connects the rule to a decodebin. The signal's return type (`GstAutoplugSelectResult`) is
/// registered by the playback plugin, so it is looked up once decodebin exists.
pub(crate) fn connect(decodebin: &gst::Element, kind: VideoDecoderKind) -> Result<(), IngestError> {
    let ty = glib::Type::from_name("GstAutoplugSelectResult").ok_or_else(|| {
        IngestError::Fatal("decodebin did not register GstAutoplugSelectResult".into())
    })?;
    // GST_AUTOPLUG_SELECT_TRY = 0, _EXPOSE = 1, _SKIP = 2. Values are not Send: the closure
    // makes its own from the type, checked here once.
    let value = move |n: i32| glib::EnumClass::with_type(ty).and_then(|c| c.to_value(n));
    if value(0).is_none() || value(2).is_none() {
        return Err(IngestError::Fatal(
            "GstAutoplugSelectResult lacks TRY or SKIP".into(),
        ));
    }
    let nvdec = if kind == VideoDecoderKind::Nvdec {
        nvdec_factories()
    } else {
        Vec::new()
    };
    decodebin.connect("autoplug-select", false, move |args| {
        let factory = args
            .get(3)
            .and_then(|v| v.get::<gst::ElementFactory>().ok());
        let Some(factory) = factory else {
            return value(0);
        };
        let caps = args.get(2).and_then(|v| v.get::<gst::Caps>().ok());
        let takes = caps.is_some_and(|caps| nvdec.iter().any(|f| f.can_sink_any_caps(&caps)));
        let plugin = factory.plugin_name();
        let candidate = Candidate {
            factory: &factory.name(),
            klass: factory.klass(),
            plugin: plugin.as_deref(),
        };
        let decision = select(kind, &candidate, takes);
        tracing::trace!(factory = %factory.name(), ?decision, %kind, "autoplug-select");
        value(match decision {
            Select::Try => 0,
            Select::Skip => 2,
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(factory: &'a str, klass: &'a str, plugin: &'a str) -> Candidate<'a> {
        Candidate {
            factory,
            klass,
            plugin: Some(plugin),
        }
    }

    #[test]
    fn names_parse_and_print() {
        for k in [VideoDecoderKind::Software, VideoDecoderKind::Nvdec] {
            assert_eq!(k.to_string().parse::<VideoDecoderKind>(), Ok(k));
        }
        let err = "vaapi".parse::<VideoDecoderKind>().unwrap_err();
        assert!(err.contains("software, nvdec"), "{err}");
    }

    #[test]
    fn software_skips_every_hardware_decoder() {
        let sw = VideoDecoderKind::Software;
        let avdec = c("avdec_h264", "Codec/Decoder/Video", "libav");
        let nv = c("nvh264dec", "Codec/Decoder/Video/Hardware", "nvcodec");
        let va = c("vah264dec", "Codec/Decoder/Video/Hardware", "va");
        let demux = c("qtdemux", "Codec/Demuxer", "isomp4");
        assert_eq!(select(sw, &avdec, true), Select::Try);
        assert_eq!(select(sw, &nv, true), Select::Skip);
        assert_eq!(select(sw, &va, false), Select::Skip);
        assert_eq!(select(sw, &demux, false), Select::Try);
    }

    #[test]
    fn nvdec_prefers_nvdec_and_falls_back_to_software() {
        let nv = VideoDecoderKind::Nvdec;
        let avdec = c("avdec_h264", "Codec/Decoder/Video", "libav");
        let nvh264 = c("nvh264dec", "Codec/Decoder/Video/Hardware", "nvcodec");
        let va = c("vah264dec", "Codec/Decoder/Video/Hardware", "va");
        let parse = c(
            "h264parse",
            "Codec/Parser/Converter/Video",
            "videoparsersbad",
        );
        let audio = c("avdec_aac", "Codec/Decoder/Audio", "libav");
        // An H.264 stream NVDEC takes: only nvh264dec may decode it.
        assert_eq!(select(nv, &nvh264, true), Select::Try);
        assert_eq!(select(nv, &avdec, true), Select::Skip);
        assert_eq!(select(nv, &va, true), Select::Skip);
        assert_eq!(select(nv, &parse, true), Select::Try);
        // A codec NVDEC lacks (e.g. MPEG-4 part 2): software decodes it.
        assert_eq!(select(nv, &avdec, false), Select::Try);
        // Not a video decoder: untouched.
        assert_eq!(select(nv, &audio, true), Select::Try);
    }

    #[test]
    fn nvdec_is_refused_where_none_is_registered() {
        // Test machines (CI) have no NVIDIA driver: nvcodec registers nothing, and the check
        // must say so rather than let every video fail later.
        if nvdec_decoders().expect("GStreamer starts").is_empty() {
            let err = check_available(VideoDecoderKind::Nvdec).unwrap_err();
            assert!(err.to_string().contains("nvcodec"), "{err}");
        }
        check_available(VideoDecoderKind::Software).expect("software is always there");
    }
}
