//! Not decoding what nobody needs: access units that no other frame references and that are not
//! among the clip's frames are dropped before the decoder. H.264: `nal_ref_idc == 0` in every
//! slice. H.265: every slice a sub-layer non-reference picture (`TRAIL_N`, `TSA_N`, …) of the
//! highest temporal sub-layer the stream declares (`hvcC`), so nothing can reference it.
//!
//! A clip keeps 16 of the 64 frames of its window, and a key-frame seek starts up to a GOP
//! before the window; most of the frames decoded on the way are B-frames nobody references.
//! Dropping them changes no other frame (nothing refers to them) and saves their decode
//! (ffmpeg's `-skip_frame noref` measures about 30 % of the decode time on B-frame-heavy
//! H.264). Frames are identified by their timestamps, so dropping is only switched on while the
//! decoder numbers frames from timestamps (constant rate, verified as it goes).

use std::sync::{Arc, Mutex};

use gst::prelude::*;
use gstreamer as gst;

/// What the probe needs to know, set per clip by the decoder.
#[derive(Clone, Debug, Default)]
pub(crate) struct SkipPlan {
    /// Dropping is allowed (timestamps give frame numbers).
    pub active: bool,
    /// Timestamp of frame 0 and the frame duration.
    pub pts0: u64,
    pub frame_ns: f64,
    /// Wanted frame numbers, sorted.
    pub wanted: Vec<u64>,
    /// Counting only: every access unit with a picture is counted and dropped (the decoder
    /// has given the stream's first frame; the rest are only counted).
    pub count_only: bool,
    /// Access units dropped so far.
    pub dropped: u64,
    /// Their timestamps (to tell a dropped frame from a gap in the stream).
    pub dropped_pts: Vec<u64>,
}

impl SkipPlan {
    /// Frames dropped with a timestamp strictly between `a` and `b`.
    pub fn dropped_between(&self, a: u64, b: u64) -> usize {
        self.dropped_pts.iter().filter(|&&p| a < p && p < b).count()
    }

    fn wants(&self, pts: u64) -> bool {
        let n = ((pts as f64 - self.pts0 as f64) / self.frame_ns).round();
        // Be conservative around anything odd: keep it.
        if !(n.is_finite() && n >= 0.0) {
            return true;
        }
        let n = n as u64;
        // Within one frame of a wanted frame (rounding at the edges) counts as wanted.
        let i = self.wanted.partition_point(|&w| w + 1 < n);
        self.wanted.get(i).is_some_and(|&w| w <= n + 1)
    }
}

/// How the stream on the decoder's input is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// Length-prefixed NAL units (`avc`/`avc3`), prefix of this many bytes.
    Length(usize),
    /// Annex-B start codes (`byte-stream`).
    StartCodes,
}

/// The codec and what its NAL headers need to be read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Codec {
    H264(Framing),
    /// H.265 with the number of temporal sub-layers its `hvcC` declares.
    H265 {
        framing: Framing,
        sub_layers: u8,
    },
}

fn codec(caps: &gst::CapsRef) -> Option<Codec> {
    let s = caps.structure(0)?;
    let format = s.get::<&str>("stream-format").ok()?;
    let codec_data = || -> Option<Vec<u8>> {
        let cd = s.get::<gst::Buffer>("codec_data").ok()?;
        let map = cd.map_readable().ok()?;
        Some(map.to_vec())
    };
    match (s.name().as_str(), format) {
        ("video/x-h264", "avc" | "avc3") => {
            let cd = codec_data()?;
            Some(Codec::H264(Framing::Length(
                usize::from(*cd.get(4)? & 0x03) + 1,
            )))
        }
        ("video/x-h264", "byte-stream") => Some(Codec::H264(Framing::StartCodes)),
        // Only length-prefixed H.265 declares its sub-layers (hvcC byte 21).
        ("video/x-h265", "hvc1" | "hev1") => {
            let b = *codec_data()?.get(21)?;
            Some(Codec::H265 {
                framing: Framing::Length(usize::from(b & 0x03) + 1),
                sub_layers: (b >> 3) & 0x07,
            })
        }
        // Sub-layers unknown: never dropped as unreferenced, only counted.
        ("video/x-h265", "byte-stream") => Some(Codec::H265 {
            framing: Framing::StartCodes,
            sub_layers: 0,
        }),
        _ => None,
    }
}

/// The first two header bytes of each NAL unit of an access unit (the second is 0 if absent).
fn nal_headers(data: &[u8], framing: Framing) -> Vec<[u8; 2]> {
    let mut out = Vec::new();
    match framing {
        Framing::Length(n) => {
            let mut at = 0usize;
            while at + n < data.len() {
                let mut len = 0usize;
                for &b in &data[at..at + n] {
                    len = (len << 8) | usize::from(b);
                }
                at += n;
                if len == 0 || at + len > data.len() {
                    break;
                }
                out.push([data[at], data.get(at + 1).copied().unwrap_or(0)]);
                at += len;
            }
        }
        Framing::StartCodes => {
            let mut i = 0usize;
            while i + 3 < data.len() {
                if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
                    out.push([data[i + 3], data.get(i + 4).copied().unwrap_or(0)]);
                    i += 3;
                } else {
                    i += 1;
                }
            }
        }
    }
    out
}

/// Whether the parser's caps leave the stream progressive (`h264parse` and `h265parse` say
/// `interlace-mode` when the sequence can code fields).
fn progressive(caps: &gst::CapsRef) -> bool {
    caps.structure(0)
        .and_then(|s| s.get::<&str>("interlace-mode").ok())
        .is_none_or(|m| m == "progressive")
}

/// `true` if the access unit holds a picture's slices (one access unit, one frame: the parser
/// before the decoder aligns buffers to access units).
fn has_slices(data: &[u8], codec: Codec) -> bool {
    match codec {
        Codec::H264(framing) => nal_headers(data, framing)
            .iter()
            .any(|[h, _]| (1..=5).contains(&(h & 0x1F))),
        Codec::H265 { framing, .. } => nal_headers(data, framing)
            .iter()
            .any(|[h0, _]| (h0 >> 1) & 0x3F <= 31),
    }
}

/// `true` if the access unit holds slices and no other picture can reference any of them.
fn is_non_reference(data: &[u8], codec: Codec) -> bool {
    let mut slices = 0;
    match codec {
        Codec::H264(framing) => {
            for [h, _] in nal_headers(data, framing) {
                let kind = h & 0x1F;
                if (1..=5).contains(&kind) {
                    if (h >> 5) & 0x03 != 0 {
                        return false;
                    }
                    slices += 1;
                }
            }
        }
        Codec::H265 {
            framing,
            sub_layers,
        } => {
            if sub_layers == 0 {
                return false; // unknown: keep everything
            }
            for [h0, h1] in nal_headers(data, framing) {
                let kind = (h0 >> 1) & 0x3F;
                if kind <= 31 {
                    // VCL: sub-layer non-reference types are the even ones up to 14, and only
                    // the highest sub-layer's are referenced by nobody.
                    let temporal_id = (h1 & 0x07).saturating_sub(1);
                    if !(kind <= 14 && kind % 2 == 0) || temporal_id + 1 != sub_layers {
                        return false;
                    }
                    slices += 1;
                }
            }
        }
    }
    slices > 0
}

/// Puts the dropping probe on an H.264 decoder's sink pad (other decoders are left alone).
pub(crate) fn attach(element: &gst::Element, plan: &Arc<Mutex<SkipPlan>>) {
    let is_video_decoder = element.factory().is_some_and(|f| {
        f.klass().contains("Decoder")
            && f.klass().contains("Video")
            && (f.name().contains("h264") || f.name().contains("h265"))
    });
    if !is_video_decoder {
        return;
    }
    let Some(pad) = element.static_pad("sink") else {
        return;
    };
    let plan = Arc::clone(plan);
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let count_only = plan.lock().unwrap_or_else(|e| e.into_inner()).count_only;
        if count_only {
            // An access unit of an interlaced stream can be one field of a frame: decoded.
            let pictures = pad
                .current_caps()
                .filter(|c| progressive(c))
                .and_then(|c| codec(&c))
                .and_then(|codec| {
                    let map = buffer.map_readable().ok()?;
                    Some(has_slices(&map, codec))
                });
            // An access unit this cannot read goes to the decoder, which counts it.
            if pictures != Some(true) {
                return gst::PadProbeReturn::Ok;
            }
            plan.lock().unwrap_or_else(|e| e.into_inner()).dropped += 1;
            info.data = None;
            return gst::PadProbeReturn::Handled;
        }
        let Some(pts) = buffer.pts() else {
            return gst::PadProbeReturn::Ok;
        };
        {
            let p = plan.lock().unwrap_or_else(|e| e.into_inner());
            if !p.active || p.wants(pts.nseconds()) {
                return gst::PadProbeReturn::Ok;
            }
        }
        let Some(codec) = pad.current_caps().and_then(|c| codec(&c)) else {
            return gst::PadProbeReturn::Ok;
        };
        let unreferenced = match buffer.map_readable() {
            Ok(map) => is_non_reference(&map, codec),
            Err(_) => false,
        };
        if !unreferenced {
            return gst::PadProbeReturn::Ok;
        }
        {
            let mut p = plan.lock().unwrap_or_else(|e| e.into_inner());
            p.dropped += 1;
            p.dropped_pts.push(pts.nseconds());
        }
        // Take the buffer out of the probe (dropping our reference) and report it handled.
        info.data = None;
        gst::PadProbeReturn::Handled
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_status_from_nal_headers() {
        // Length-prefixed: an SEI (type 6) and a non-reference slice (ref_idc 0, type 1).
        let au = [0, 0, 0, 2, 0x06, 0xAA, 0, 0, 0, 2, 0x01, 0xBB];
        assert!(is_non_reference(&au, Codec::H264(Framing::Length(4))));
        // A reference P slice (ref_idc 2).
        let p = [0, 0, 0, 2, 0x41, 0xBB];
        assert!(!is_non_reference(&p, Codec::H264(Framing::Length(4))));
        // An IDR slice (type 5, ref_idc 3).
        let idr = [0, 0, 1, 0x65, 0x88];
        assert!(!is_non_reference(&idr, Codec::H264(Framing::StartCodes)));
        // No slices at all: keep.
        assert!(!is_non_reference(
            &[0, 0, 1, 0x06, 0],
            Codec::H264(Framing::StartCodes)
        ));
        // Two non-reference slices with start codes.
        let b = [0, 0, 0, 1, 0x01, 0x9A, 0, 0, 1, 0x01, 0x9B];
        assert!(is_non_reference(&b, Codec::H264(Framing::StartCodes)));
        // Pictures, referenced or not; parameter sets and SEI alone are none.
        assert!(has_slices(&p, Codec::H264(Framing::Length(4))));
        assert!(has_slices(&b, Codec::H264(Framing::StartCodes)));
        assert!(has_slices(&idr, Codec::H264(Framing::StartCodes)));
        assert!(has_slices(&au, Codec::H264(Framing::Length(4))));
        assert!(!has_slices(
            &[0, 0, 1, 0x06, 0, 0, 0, 1, 0x67, 0x42],
            Codec::H264(Framing::StartCodes)
        ));
    }

    #[test]
    fn h265_sub_layer_non_reference_pictures() {
        let one = |sub_layers| Codec::H265 {
            framing: Framing::Length(4),
            sub_layers,
        };
        // TRAIL_N (type 0), TemporalId 0: droppable when the stream has one sub-layer.
        let trail_n = [0, 0, 0, 3, 0x00, 0x01, 0xAA];
        assert!(is_non_reference(&trail_n, one(1)));
        // ... but not when a higher sub-layer could reference it, or when unknown.
        assert!(!is_non_reference(&trail_n, one(2)));
        assert!(!is_non_reference(&trail_n, one(0)));
        // TRAIL_R (type 1) is a reference.
        let trail_r = [0, 0, 0, 3, 0x02, 0x01, 0xAA];
        assert!(!is_non_reference(&trail_r, one(1)));
        // A parameter set alone (VPS, type 32) has no slice: keep.
        assert!(!is_non_reference(&[0, 0, 0, 2, 0x40, 0x01], one(1)));
        // Pictures whatever their reference status; a parameter set is none.
        assert!(has_slices(&trail_n, one(2)) && has_slices(&trail_r, one(0)));
        assert!(!has_slices(&[0, 0, 0, 2, 0x40, 0x01], one(1)));
    }

    #[test]
    fn wanted_frames_with_a_margin() {
        let at = |n: u64| 1000 + n * 100;
        let plan = SkipPlan {
            active: true,
            pts0: 1000,
            frame_ns: 100.0,
            wanted: vec![10, 20],
            count_only: false,
            dropped: 0,
            dropped_pts: vec![at(3), at(4)],
        };
        assert_eq!(plan.dropped_between(at(2), at(5)), 2);
        assert_eq!(plan.dropped_between(at(3), at(4)), 0);
        assert!(plan.wants(at(10)) && plan.wants(at(20)));
        assert!(plan.wants(at(9)) && plan.wants(at(21)));
        assert!(!plan.wants(at(15)) && !plan.wants(at(0)) && !plan.wants(at(30)));
        assert!(plan.wants(500)); // before frame 0: keep
    }
}
