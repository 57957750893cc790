//! Which video decoders `decodebin` may plug: software only (the default, the same frames on
//! every machine), or NVIDIA's NVDEC through GStreamer's `nvcodec` elements (`nvh264dec`,
//! `nvh265dec`, `nvvp9dec`, …) so that a GPU machine's CPU cores are not the ingest's limit.
//!
//! The choice is made per decoder in decodebin's `autoplug-select` signal rather than by
//! changing element ranks, which are process-wide: two decoders in one process may differ.
//!
//! NVDEC mode needs two more of decodebin's signals (connected in that mode only):
//!
//! * `autoplug-sort` puts the NVDEC decoders ahead of the software ones instead of skipping the
//!   software ones, so that a stream whose NVDEC element cannot open (no CUDA context, no
//!   `libnvcuvid`) falls back to software rather than to nothing. Among NVDEC decoders the
//!   stateless ones (GstCodecs-based: `nvh264sldec`, `nvh265sldec`, `nvvp9sldec`, `nvav1dec`)
//!   go first: the cuvid-parser ones (`nvh264dec`, `nvvp9dec`, … in 1.22) can mis-time VP9
//!   superframes and were removed upstream in 1.24. Parsers go ahead of all decoders, so that
//!   e.g. `vp9parse` (ranked below libvpx) splits VP9 superframes for `nvvp9sldec`.
//! * `autoplug-query` answers a decoder's caps queries while its pad is not exposed yet. Both
//!   NVDEC families choose their output memory from the caps downstream allows when they first
//!   negotiate, which happens before decodebin exposes the pad; unanswered, the query returns the
//!   decoder's own template (CUDA memory first), the decoder outputs CUDA memory and the clip
//!   cannot be linked to `videoconvert`. Forwarding the query to `videoconvert` (as `playbin`
//!   does with its sinks) makes them download to system memory.

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::glib::translate::ToGlibPtr;
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
    /// codecs NVDEC lacks and where no NVDEC element can open. Frames are downloaded to system
    /// memory (what `videoconvert` takes).
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
    /// Plug it (decodebin tries the candidates in order, see [`nvdec_order`]).
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

/// The rule: demuxers, parsers and everything else pass; among decoders, `kind` decides.
/// Software skips every hardware decoder. NVDEC mode skips only the other hardware decoders
/// (VA-API, V4L2, …) and lets software decoders through: `autoplug-sort` puts them after the
/// NVDEC ones ([`nvdec_order`]), so they decode only what NVDEC lacks or cannot open.
pub(crate) fn select(kind: VideoDecoderKind, c: &Candidate<'_>) -> Select {
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
        VideoDecoderKind::Nvdec => Select::Try,
    }
}

/// The two NVDEC decoder families of `nvcodec` (GStreamer 1.22).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NvdecFamily {
    /// GstCodecs-based (`GstH264Decoder` & co.): `nvh264sldec`, `nvh265sldec`, `nvvp9sldec`,
    /// `nvav1dec` — and `nvh264dec` & co. themselves where `GST_USE_NV_STATELESS_CODEC` makes
    /// the stateless element the primary one.
    Stateless,
    /// Subclasses of `GstNvDec`, which parse with NVIDIA's cuvid parser: `nvh264dec`,
    /// `nvh265dec`, `nvvp9dec`, `nvmpeg2videodec`, … (removed upstream in 1.24).
    Cuvid,
}

/// The abstract base type of the cuvid-parser decoders.
const CUVID_BASE_TYPE: &str = "GstNvDec";

/// Which family an NVDEC element belongs to. `ancestry` is the names of its element type's
/// ancestors, when the type could be inspected: that is the reliable test (the element names
/// are reused across families, see [`NvdecFamily::Stateless`]). Without it, the 1.22 names are
/// the guide: `nv<codec>sldec`, `nv<codec>sldevice<N>dec` and `nvav1…` (AV1 has only a
/// stateless decoder) are stateless.
pub(crate) fn nvdec_family(factory: &str, ancestry: Option<&[&str]>) -> NvdecFamily {
    let stateless = match ancestry {
        Some(types) => !types.contains(&CUVID_BASE_TYPE),
        None => {
            factory.starts_with("nvav1")
                || factory.contains("sldec")
                || factory.contains("sldevice")
        }
    };
    if stateless {
        NvdecFamily::Stateless
    } else {
        NvdecFamily::Cuvid
    }
}

/// [`nvdec_family`] of a factory, from its element type's ancestry. The type is known once the
/// plugin is loaded; it is loaded here if need be (decodebin loads it anyway to create the
/// element, and NVDEC elements are tried first). Falls back to the name if loading fails.
fn factory_family(factory: &gst::ElementFactory) -> NvdecFamily {
    let mut ty = factory.element_type();
    if !ty.is_valid() {
        ty = factory
            .load()
            .map(|f| f.element_type())
            .unwrap_or(glib::Type::INVALID);
    }
    let ancestry: Option<Vec<&str>> = ty.is_valid().then(|| {
        std::iter::successors(ty.parent(), |t| t.parent())
            .map(|t| t.name())
            .collect()
    });
    nvdec_family(&factory.name(), ancestry.as_deref())
}

/// Where a candidate goes in an NVDEC-mode decodebin's try order: lower first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// Parsers stay ahead of every decoder, as rank order has them for H.264/H.265: they put
    /// the stream in the form the decoders take (VP9 superframes split for `nvvp9sldec`,
    /// byte-stream for `nvh264dec`), and a parser ranked below a software decoder (`vp9parse`)
    /// must not lose to that decoder.
    Parser,
    /// Stateless NVDEC decoders.
    NvdecStateless,
    /// Cuvid-parser NVDEC decoders.
    NvdecCuvid,
    /// Everything else: software decoders, demuxers, …
    Other,
}

/// The tier of one candidate; `family` is asked for NVDEC video decoders only.
pub(crate) fn tier(c: &Candidate<'_>, family: impl FnOnce() -> NvdecFamily) -> Tier {
    if c.klass.contains("Parser") {
        Tier::Parser
    } else if c.klass.contains("Decoder")
        && c.klass.contains("Video")
        && is_nvdec(c.factory, c.plugin)
    {
        match family() {
            NvdecFamily::Stateless => Tier::NvdecStateless,
            NvdecFamily::Cuvid => Tier::NvdecCuvid,
        }
    } else {
        Tier::Other
    }
}

/// NVDEC mode's order of decodebin's candidates (given in rank order): by [`Tier`], rank order
/// within a tier. `None` (leave decodebin's order alone) when no NVDEC decoder is among them,
/// or when they are in that order already.
pub(crate) fn nvdec_order<T>(items: &[T], tier: impl Fn(&T) -> Tier) -> Option<Vec<usize>> {
    let tiers: Vec<Tier> = items.iter().map(tier).collect();
    let has_nvdec = tiers
        .iter()
        .any(|t| matches!(t, Tier::NvdecStateless | Tier::NvdecCuvid));
    if !has_nvdec || tiers.is_sorted() {
        return None;
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| tiers[i]); // stable: rank order within a tier
    Some(order)
}

/// Connects the rule (and, in NVDEC mode, the try order and the caps answers; see the module
/// doc) to a decodebin whose raw video goes to `convert_sink`. The `autoplug-select` return
/// type (`GstAutoplugSelectResult`) is registered by the playback plugin, so it is looked up
/// once decodebin exists.
pub(crate) fn connect(
    decodebin: &gst::Element,
    kind: VideoDecoderKind,
    convert_sink: &gst::Pad,
) -> Result<(), IngestError> {
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
    decodebin.connect("autoplug-select", false, move |args| {
        let factory = args
            .get(3)
            .and_then(|v| v.get::<gst::ElementFactory>().ok());
        let Some(factory) = factory else {
            return value(0);
        };
        let plugin = factory.plugin_name();
        let candidate = Candidate {
            factory: &factory.name(),
            klass: factory.klass(),
            plugin: plugin.as_deref(),
        };
        let decision = select(kind, &candidate);
        tracing::trace!(factory = %factory.name(), ?decision, %kind, "autoplug-select");
        value(match decision {
            Select::Try => 0,
            Select::Skip => 2,
        })
    });
    if kind == VideoDecoderKind::Nvdec {
        connect_nvdec_sort(decodebin);
        connect_caps_answers(decodebin, convert_sink);
    }
    Ok(())
}

/// The context type under which GStreamer's CUDA elements share a `GstCudaContext`
/// (`GST_CUDA_CONTEXT_TYPE`).
pub(crate) const CUDA_CONTEXT_TYPE: &str = "gst.cuda.context";

/// The CUDA contexts NVDEC decoders of this process created, one per device (a context
/// carries its `cuda-device-id`; a decoder for another device ignores it and makes its own).
static SHARED_CUDA: std::sync::Mutex<Vec<gst::Context>> = std::sync::Mutex::new(Vec::new());

/// Makes every NVDEC decoder of this process share the first CUDA context made on its device.
///
/// An nvcodec decoder that finds no CUDA context in its pipeline creates one (`cuCtxCreate`:
/// a context of its own, hundreds of MB of device memory and ~0.1 s), and a pipeline keeps
/// what its elements made. With one pipeline per decode thread, and a new pipeline after each
/// failed clip, a job would hold a CUDA context per decode thread beside the trainer's. The
/// decoders look for a context first by posting `need-context`, and announce one they made
/// with `have-context`, both under a process-wide lock (`gst_cuda_ensure_element_context`),
/// so answering the one from what the other announced, synchronously on every decode
/// pipeline's bus, leaves one CUDA context per device for all decoders.
pub(crate) fn share_cuda_contexts(bus: &gst::Bus) {
    bus.set_sync_handler(|_, msg| {
        match msg.view() {
            gst::MessageView::NeedContext(m) if m.context_type() == CUDA_CONTEXT_TYPE => {
                let element = msg.src().and_then(|s| s.downcast_ref::<gst::Element>());
                if let Some(element) = element {
                    let shared = SHARED_CUDA
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    // An element takes the first context of its device and ignores the rest.
                    for context in &shared {
                        element.set_context(context);
                    }
                }
            }
            gst::MessageView::HaveContext(m) => {
                let context = m.context();
                if context.context_type() == CUDA_CONTEXT_TYPE {
                    let device = cuda_device_id(&context);
                    let mut shared = SHARED_CUDA.lock().unwrap_or_else(|e| e.into_inner());
                    if !shared.iter().any(|c| cuda_device_id(c) == device) {
                        tracing::debug!(?device, "sharing the CUDA context of the NVDEC decoders");
                        shared.push(context);
                    }
                }
            }
            _ => {}
        }
        gst::BusSyncReply::Pass
    });
}

/// The device a CUDA context is for (`cuda-device-id` of its structure).
fn cuda_device_id(context: &gst::Context) -> Option<u32> {
    context.structure().get::<u32>("cuda-device-id").ok()
}

/// `autoplug-sort`: [`nvdec_order`] on the candidates (a handler returning `NULL` keeps
/// decodebin's order).
fn connect_nvdec_sort(decodebin: &gst::Element) {
    decodebin.connect("autoplug-sort", false, |args| {
        let keep = || Some(None::<glib::ValueArray>.to_value());
        let Some(array) = args.get(3).and_then(|v| v.get::<&glib::ValueArray>().ok()) else {
            return keep();
        };
        let factories: Vec<gst::ElementFactory> = array
            .iter()
            .filter_map(|v| v.get::<gst::ElementFactory>().ok())
            .collect();
        if factories.len() != array.len() {
            return keep(); // not all factories: not ours to judge
        }
        let order = nvdec_order(&factories, |f| {
            let plugin = f.plugin_name();
            let candidate = Candidate {
                factory: &f.name(),
                klass: f.klass(),
                plugin: plugin.as_deref(),
            };
            tier(&candidate, || factory_family(f))
        });
        let Some(order) = order else {
            return keep();
        };
        tracing::trace!(
            order = ?order.iter().map(|&i| factories[i].name()).collect::<Vec<_>>(),
            "autoplug-sort (NVDEC first)"
        );
        let sorted = glib::ValueArray::from_values(order.iter().map(|&i| factories[i].to_value()));
        Some(sorted.to_value())
    });
}

/// `autoplug-query`: a video decoder's CAPS and ACCEPT_CAPS queries, made before its pad is
/// exposed, are answered by `videoconvert`'s sink pad (what the decoded video will be linked
/// to). Parsers and every other query get decodebin's default (unanswered): a parser asked
/// about raw video caps would fail to negotiate.
fn connect_caps_answers(decodebin: &gst::Element, convert_sink: &gst::Pad) {
    let convert_sink = convert_sink.clone();
    decodebin.connect("autoplug-query", false, move |args| {
        let is_video_decoder = args
            .get(2)
            .and_then(|v| v.get::<gst::Element>().ok())
            .and_then(|e| e.factory())
            .is_some_and(|f| f.klass().contains("Decoder") && f.klass().contains("Video"));
        if !is_video_decoder {
            return Some(false.to_value());
        }
        let answered = args.get(3).and_then(|value| {
            with_query_mut(value, |query| match query.view() {
                gst::QueryView::Caps(_) | gst::QueryView::AcceptCaps(_) => {
                    convert_sink.query(query)
                }
                _ => false,
            })
        });
        let answered = answered.unwrap_or(false);
        tracing::trace!(answered, "autoplug-query");
        Some(answered.to_value())
    });
}

/// Runs `answer` on the query an `autoplug-query` emission carries, writable, so that the
/// answer reaches the element that asked (gstreamer-rs gives only shared references, or
/// copies, from a `Value`). `None` if `value` holds no query.
fn with_query_mut<R>(
    value: &glib::Value,
    answer: impl FnOnce(&mut gst::QueryRef) -> R,
) -> Option<R> {
    if !value.type_().is_a(gst::Query::static_type()) {
        return None;
    }
    // SAFETY: the value holds a GstQuery (type checked above). The signal passes it with
    // G_SIGNAL_TYPE_STATIC_SCOPE: it is the very query the element made, not a copy, owned by
    // the caller of gst_pad_query(), which waits for this handler and then reads the answer
    // from it. So it is valid, writable (queries in flight are), and nobody else touches it
    // while `answer` runs; the borrow does not outlive this call. playbin's handler writes
    // its answer into the same query the same way.
    let query = unsafe {
        let ptr =
            glib::gobject_ffi::g_value_get_boxed(value.to_glib_none().0) as *mut gst::ffi::GstQuery;
        if ptr.is_null() {
            return None;
        }
        gst::QueryRef::from_mut_ptr(ptr)
    };
    Some(answer(query))
}

/// What a decodebin's raw video pad was decoded by, for logs and [`crate::DecodeStats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UsedDecoder {
    /// The factory name (`nvh264sldec`, `avdec_h264`, …).
    pub factory: String,
    /// It is an NVDEC element.
    pub nvdec: bool,
}

/// The video decoder behind a decodebin source pad (the element its ghost pad targets), if that
/// element is a video decoder (raw video in a container has none).
pub(crate) fn used_decoder(pad: &gst::Pad) -> Option<UsedDecoder> {
    let target = pad.downcast_ref::<gst::GhostPad>()?.target()?;
    element_decoder(&target.parent_element()?)
}

/// `element` as a [`UsedDecoder`], if it is a video decoder.
pub(crate) fn element_decoder(element: &gst::Element) -> Option<UsedDecoder> {
    let factory = element.factory()?;
    if !(factory.klass().contains("Decoder") && factory.klass().contains("Video")) {
        return None;
    }
    let name = factory.name().to_string();
    let nvdec = is_nvdec(&name, factory.plugin_name().as_deref());
    Some(UsedDecoder {
        factory: name,
        nvdec,
    })
}

/// Logs (INFO) the first time in this process that a video decoder element decodes a clip, so
/// that a run's log shows whether NVDEC really decoded (or which software decoder did).
pub(crate) fn log_first_use(used: &UsedDecoder, kind: VideoDecoderKind) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&used.factory) {
        return;
    }
    seen.push(used.factory.clone());
    drop(seen);
    let family = if used.nvdec { "NVDEC" } else { "software" };
    tracing::info!(
        decoder = %used.factory,
        nvdec = used.nvdec,
        mode = %kind,
        "video decoder: {} ({family})",
        used.factory
    );
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
        let nvsl = c("nvh264sldec", "Codec/Decoder/Video/Hardware", "nvcodec");
        let va = c("vah264dec", "Codec/Decoder/Video/Hardware", "va");
        let demux = c("qtdemux", "Codec/Demuxer", "isomp4");
        assert_eq!(select(sw, &avdec), Select::Try);
        assert_eq!(select(sw, &nv), Select::Skip);
        assert_eq!(select(sw, &nvsl), Select::Skip);
        assert_eq!(select(sw, &va), Select::Skip);
        assert_eq!(select(sw, &demux), Select::Try);
    }

    #[test]
    fn nvdec_tries_nvdec_and_software_but_no_other_hardware() {
        let nv = VideoDecoderKind::Nvdec;
        let avdec = c("avdec_h264", "Codec/Decoder/Video", "libav");
        let nvh264 = c("nvh264dec", "Codec/Decoder/Video/Hardware", "nvcodec");
        let nvh264sl = c("nvh264sldec", "Codec/Decoder/Video/Hardware", "nvcodec");
        let va = c("vah264dec", "Codec/Decoder/Video/Hardware", "va");
        let parse = c(
            "h264parse",
            "Codec/Parser/Converter/Video",
            "videoparsersbad",
        );
        let audio = c("avdec_aac", "Codec/Decoder/Audio", "libav");
        assert_eq!(select(nv, &nvh264), Select::Try);
        assert_eq!(select(nv, &nvh264sl), Select::Try);
        // Software stays a candidate (after NVDEC, see `nvdec_order`): the fallback for an
        // NVDEC element that cannot open, and for codecs NVDEC lacks.
        assert_eq!(select(nv, &avdec), Select::Try);
        assert_eq!(select(nv, &va), Select::Skip);
        assert_eq!(select(nv, &parse), Select::Try);
        assert_eq!(select(nv, &audio), Select::Try);
    }

    #[test]
    fn nvdec_family_from_type_ancestry_or_name() {
        use NvdecFamily::{Cuvid, Stateless};
        let cuvid = ["GstNvDec", "GstVideoDecoder", "GstElement"];
        let codecs = ["GstH264Decoder", "GstVideoDecoder", "GstElement"];
        // The type decides, whatever the name: with GST_USE_NV_STATELESS_CODEC=h264, the
        // stateless decoder is registered as `nvh264dec`.
        assert_eq!(nvdec_family("nvh264dec", Some(&cuvid)), Cuvid);
        assert_eq!(nvdec_family("nvh264dec", Some(&codecs)), Stateless);
        assert_eq!(nvdec_family("nvh264sldec", Some(&codecs)), Stateless);
        assert_eq!(nvdec_family("nvmpeg2videodec", Some(&cuvid)), Cuvid);
        // Without the type: the 1.22 names.
        for name in [
            "nvh264sldec",
            "nvh265sldec",
            "nvvp9sldec",
            "nvav1dec",
            "nvh264sldevice1dec",
            "nvav1device1dec",
        ] {
            assert_eq!(nvdec_family(name, None), Stateless, "{name}");
        }
        for name in ["nvh264dec", "nvh265dec", "nvvp9dec", "nvh264device1dec"] {
            assert_eq!(nvdec_family(name, None), Cuvid, "{name}");
        }
    }

    /// Candidates as decodebin offers them (rank order), with their families known by name.
    fn ordered(names: &[(&str, &str, &str)]) -> Option<Vec<String>> {
        let order = nvdec_order(names, |&(factory, klass, plugin)| {
            tier(&c(factory, klass, plugin), || nvdec_family(factory, None))
        })?;
        Some(order.iter().map(|&i| names[i].0.to_string()).collect())
    }

    #[test]
    fn nvdec_order_stateless_then_cuvid_then_software_parsers_first() {
        const HW: &str = "Codec/Decoder/Video/Hardware";
        const SW: &str = "Codec/Decoder/Video";
        const PARSER: &str = "Codec/Parser/Converter/Video";
        // H.264 as 1.22 ranks it: h264parse PRIMARY+1, nvh264dec/avdec PRIMARY, sl SECONDARY.
        let h264 = [
            ("h264parse", PARSER, "videoparsersbad"),
            ("avdec_h264", SW, "libav"),
            ("nvh264dec", HW, "nvcodec"),
            ("nvh264sldec", HW, "nvcodec"),
            ("openh264dec", SW, "openh264"),
        ];
        assert_eq!(
            ordered(&h264).expect("NVDEC present"),
            [
                "h264parse",
                "nvh264sldec",
                "nvh264dec",
                "avdec_h264",
                "openh264dec"
            ]
        );
        // VP9: vp9parse (SECONDARY) ranks below libvpx's vp9dec; NVDEC mode needs it first
        // (nvvp9sldec takes frame-aligned VP9 only).
        let vp9 = [
            ("nvvp9dec", HW, "nvcodec"),
            ("vp9dec", SW, "vpx"),
            ("avdec_vp9", SW, "libav"),
            ("nvvp9sldec", HW, "nvcodec"),
            ("vp9parse", PARSER, "videoparsersbad"),
        ];
        assert_eq!(
            ordered(&vp9).expect("NVDEC present"),
            ["vp9parse", "nvvp9sldec", "nvvp9dec", "vp9dec", "avdec_vp9"]
        );
        // AV1: only a stateless NVDEC decoder (PRIMARY); av1parse and aom's av1dec SECONDARY.
        let av1 = [
            ("nvav1dec", HW, "nvcodec"),
            ("av1dec", SW, "aom"),
            ("av1parse", PARSER, "videoparsersbad"),
        ];
        assert_eq!(
            ordered(&av1).expect("NVDEC present"),
            ["av1parse", "nvav1dec", "av1dec"]
        );
        // No NVDEC decoder among them (a codec NVDEC lacks, or a container): untouched.
        let mpeg4 = [
            ("mpeg4videoparse", PARSER, "videoparsersbad"),
            ("avdec_mpeg4", SW, "libav"),
        ];
        assert_eq!(ordered(&mpeg4), None);
        // Already in order: untouched.
        let in_order = [
            ("h264parse", PARSER, "videoparsersbad"),
            ("nvh264sldec", HW, "nvcodec"),
            ("avdec_h264", SW, "libav"),
        ];
        assert_eq!(ordered(&in_order), None);
        assert_eq!(ordered(&[("qtdemux", "Codec/Demuxer", "isomp4")]), None);
        assert_eq!(ordered(&[]), None);
    }

    #[test]
    fn nvdec_order_asks_the_family_of_nvdec_decoders_only() {
        let names = [
            (
                "h264parse",
                "Codec/Parser/Converter/Video",
                "videoparsersbad",
            ),
            ("avdec_h264", "Codec/Decoder/Video", "libav"),
            ("nvh264dec", "Codec/Decoder/Video/Hardware", "nvcodec"),
        ];
        let asked = std::cell::RefCell::new(Vec::new());
        let order = nvdec_order(&names, |&(factory, klass, plugin)| {
            tier(&c(factory, klass, plugin), || {
                asked.borrow_mut().push(factory);
                // As the type would say with GST_USE_NV_STATELESS_CODEC=h264.
                NvdecFamily::Stateless
            })
        });
        assert_eq!(order, Some(vec![0, 2, 1]));
        assert_eq!(*asked.borrow(), ["nvh264dec"]);
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

    /// What one decode pipeline's decoder announces (`have-context`) answers the
    /// `need-context` of a decoder in another pipeline: one CUDA context per device for all.
    #[test]
    fn cuda_contexts_are_shared_across_decode_pipelines() {
        crate::init().expect("GStreamer starts");
        let pipeline_with = |element: &gst::Element| {
            let p = gst::Pipeline::new();
            p.add(element).expect("add");
            share_cuda_contexts(&p.bus().expect("bus"));
            // Decoders look for their context when they open (NULL to READY); a pipeline's bus
            // drops messages in NULL.
            p.set_state(gst::State::Ready).expect("ready");
            p
        };
        let context = |device: u32| {
            let mut c = gst::Context::new(CUDA_CONTEXT_TYPE, true);
            c.get_mut()
                .expect("new context is writable")
                .structure_mut()
                .set("cuda-device-id", device);
            c
        };
        let first = gst::ElementFactory::make("identity")
            .build()
            .expect("identity");
        let _p1 = pipeline_with(&first);
        let made = context(0);
        first
            .post_message(
                gst::message::HaveContext::builder(made.clone())
                    .src(&first)
                    .build(),
            )
            .expect("posted");
        // Another device's context is kept beside it, not instead of it.
        first
            .post_message(
                gst::message::HaveContext::builder(context(1))
                    .src(&first)
                    .build(),
            )
            .expect("posted");
        // A second context for device 0 is not taken over the first.
        first
            .post_message(
                gst::message::HaveContext::builder(context(0))
                    .src(&first)
                    .build(),
            )
            .expect("posted");

        let second = gst::ElementFactory::make("identity")
            .build()
            .expect("identity");
        let _p2 = pipeline_with(&second);
        assert!(second.context(CUDA_CONTEXT_TYPE).is_none());
        second
            .post_message(
                gst::message::NeedContext::builder(CUDA_CONTEXT_TYPE)
                    .src(&second)
                    .build(),
            )
            .expect("posted");
        let got = second
            .context(CUDA_CONTEXT_TYPE)
            .expect("need-context answered");
        assert!(got.structure().get::<u32>("cuda-device-id").is_ok());
        let shared = SHARED_CUDA.lock().expect("lock");
        let devices: Vec<Option<u32>> = shared.iter().map(cuda_device_id).collect();
        assert_eq!(devices, [Some(0), Some(1)]);
        assert_eq!(
            shared[0].as_ptr(),
            made.as_ptr(),
            "the first context of device 0"
        );
    }

    #[test]
    fn video_decoders_are_told_from_other_elements() {
        crate::init().expect("GStreamer starts");
        let make = |name: &str| gst::ElementFactory::make(name).build().expect(name);
        assert_eq!(
            element_decoder(&make("avdec_h264")),
            Some(UsedDecoder {
                factory: "avdec_h264".into(),
                nvdec: false
            })
        );
        for other in ["videoconvert", "h264parse", "qtdemux", "avdec_aac"] {
            assert_eq!(element_decoder(&make(other)), None, "{other}");
        }
    }
}
