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

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use gst::prelude::*;
use gstreamer as gst;

use crate::clock::FrameClock;

/// What the probe needs to know, set per clip by the decoder.
#[derive(Clone, Debug, Default)]
pub(crate) struct SkipPlan {
    /// Dropping is allowed (timestamps give frame numbers).
    pub active: bool,
    /// How timestamps give frame numbers (`None`: they do not; nothing is dropped).
    pub clock: Option<FrameClock>,
    /// Wanted frame numbers, sorted.
    pub wanted: Vec<u64>,
    /// Counting only: every access unit with a picture is counted and dropped (the decoder
    /// has given the stream's first frame; the rest are only counted).
    pub count_only: bool,
    /// Access units dropped so far.
    pub dropped: u64,
    /// Counting only: the timestamps of the access units counted and dropped (for the
    /// frames' times, [`crate::known`]); `counted_untimed` if one had none.
    pub counted_pts: Vec<u64>,
    pub counted_untimed: bool,
    /// Their timestamps (to tell a dropped frame from a gap in the stream). A set: after a
    /// seek back (a retry from further back), the same frames are dropped again.
    pub dropped_pts: BTreeSet<u64>,
}

impl SkipPlan {
    /// Frames dropped with a timestamp strictly between `a` and `b`.
    pub fn dropped_between(&self, a: u64, b: u64) -> usize {
        if b <= a.saturating_add(1) {
            return 0;
        }
        self.dropped_pts.range(a + 1..b).count()
    }

    fn wants(&self, pts: u64) -> bool {
        // Be conservative around anything odd: keep it.
        let Some(n) = self.clock.as_ref().and_then(|c| c.number(pts)) else {
            return true;
        };
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
    /// VP9: only counted (a packet is a frame, or a superframe of a hidden frame and the one
    /// it shows); never dropped as unreferenced.
    Vp9,
}

fn codec(caps: &gst::CapsRef) -> Option<Codec> {
    let s = caps.structure(0)?;
    if s.name() == "video/x-vp9" {
        return Some(Codec::Vp9);
    }
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

/// Whether the decoder makes a frame of this buffer: an access unit with a picture's slices
/// (the parser before the decoder aligns buffers to access units: one access unit, one
/// frame), a VP9 packet with a shown frame. `None`: a VP9 packet this cannot read.
fn outputs_a_frame(data: &[u8], codec: Codec) -> Option<bool> {
    match codec {
        Codec::H264(framing) => Some(
            nal_headers(data, framing)
                .iter()
                .any(|[h, _]| (1..=5).contains(&(h & 0x1F))),
        ),
        Codec::H265 { framing, .. } => Some(
            nal_headers(data, framing)
                .iter()
                .any(|[h0, _]| (h0 >> 1) & 0x3F <= 31),
        ),
        // A VP9 decoder outputs at most one picture per packet: the last frame's, if shown.
        Codec::Vp9 => {
            let mut shown = None;
            for frame in vp9_frames(data)? {
                shown = Some(vp9_shows(frame)?);
            }
            shown
        }
    }
}

/// The frames of a VP9 packet: the whole packet, or the frames a superframe index at its end
/// lists (VP9 spec, annex B: a marker byte `110ssnnn` at both ends of the index, then
/// `nn + 1` frame sizes of `ss + 1` little-endian bytes). `None` if the index is inconsistent.
fn vp9_frames(data: &[u8]) -> Option<Vec<&[u8]>> {
    let last = *data.last()?;
    if last & 0xE0 != 0xC0 {
        return Some(vec![data]);
    }
    let frames = usize::from(last & 0x07) + 1;
    let size_bytes = usize::from((last >> 3) & 0x03) + 1;
    let index_len = 2 + size_bytes * frames;
    let Some(index_at) = data.len().checked_sub(index_len) else {
        return Some(vec![data]);
    };
    if data[index_at] != last {
        // The last byte only looks like a marker: a plain frame.
        return Some(vec![data]);
    }
    let mut out = Vec::with_capacity(frames);
    let mut start = 0usize;
    for f in 0..frames {
        let at = index_at + 1 + f * size_bytes;
        let size = data[at..at + size_bytes]
            .iter()
            .rev()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        let end = start.checked_add(size)?;
        if end > index_at {
            return None;
        }
        out.push(&data[start..end]);
        start = end;
    }
    Some(out)
}

/// Whether a VP9 frame is shown, from its uncompressed header's first byte: frame marker
/// (2 bits, `10`), profile (2 bits, and a reserved bit in profile 3), `show_existing_frame`,
/// `frame_type`, `show_frame`. `None` if it is not a VP9 frame header.
fn vp9_shows(frame: &[u8]) -> Option<bool> {
    let b = *frame.first()?;
    if b >> 6 != 0b10 {
        return None;
    }
    let bit = |i: u32| (b >> (7 - i)) & 1 == 1;
    let profile = u8::from(bit(2)) | (u8::from(bit(3)) << 1);
    let at = if profile == 3 { 5 } else { 4 };
    Some(bit(at) || bit(at + 2))
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
        Codec::Vp9 => return false,
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

/// Whether the probe counts (and drops) the pictures before a decoder of this factory, rather
/// than the decoder decoding them to be counted.
pub(crate) fn counts_before_decoder(factory: &str) -> bool {
    ["h264", "h265", "vp9"].iter().any(|c| factory.contains(c))
}

/// Puts the dropping probe on an H.264, H.265 or VP9 decoder's sink pad (other decoders are
/// left alone; VP9 frames are only ever dropped when counted).
pub(crate) fn attach(element: &gst::Element, plan: &Arc<Mutex<SkipPlan>>) {
    let is_video_decoder = element.factory().is_some_and(|f| {
        f.klass().contains("Decoder")
            && f.klass().contains("Video")
            && counts_before_decoder(f.name().as_str())
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
                    // `vp9parse`, splitting a superframe for a decoder that takes one frame at
                    // a time, marks all but its last frame decode-only: no picture comes out.
                    if codec == Codec::Vp9 && buffer.flags().contains(gst::BufferFlags::DECODE_ONLY)
                    {
                        return Some(false);
                    }
                    let map = buffer.map_readable().ok()?;
                    outputs_a_frame(&map, codec)
                });
            // An access unit this cannot read goes to the decoder, which counts it.
            if pictures != Some(true) {
                return gst::PadProbeReturn::Ok;
            }
            let mut p = plan.lock().unwrap_or_else(|e| e.into_inner());
            p.dropped += 1;
            match buffer.pts() {
                Some(pts) => p.counted_pts.push(pts.nseconds()),
                None => p.counted_untimed = true,
            }
            drop(p);
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
            p.dropped_pts.insert(pts.nseconds());
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
        let frame = |data: &[u8], codec| outputs_a_frame(data, codec) == Some(true);
        assert!(frame(&p, Codec::H264(Framing::Length(4))));
        assert!(frame(&b, Codec::H264(Framing::StartCodes)));
        assert!(frame(&idr, Codec::H264(Framing::StartCodes)));
        assert!(frame(&au, Codec::H264(Framing::Length(4))));
        assert_eq!(
            outputs_a_frame(
                &[0, 0, 1, 0x06, 0, 0, 0, 1, 0x67, 0x42],
                Codec::H264(Framing::StartCodes)
            ),
            Some(false)
        );
    }

    #[test]
    fn vp9_packets_that_show_a_frame() {
        // Frame headers' first byte: marker 10, profile 0, then show_existing_frame,
        // frame_type, show_frame.
        let shown_key = 0b1000_0010u8; // key frame, shown
        let hidden = 0b1000_0100u8; // inter frame, not shown
        let existing = 0b1000_1000u8; // shows an earlier frame
        let profile3_shown = 0b1011_0001u8; // profile 3: a reserved bit first
        let show = |b: &[u8]| outputs_a_frame(b, Codec::Vp9);
        assert_eq!(show(&[shown_key, 1, 2, 3]), Some(true));
        assert_eq!(show(&[hidden, 1, 2, 3]), Some(false));
        assert_eq!(show(&[existing]), Some(true));
        assert_eq!(show(&[profile3_shown, 0]), Some(true));
        assert_eq!(show(&[0x00, 1]), None); // not a frame header
        // A superframe: a hidden frame of 3 bytes and a shown one of 2; index 0xC1 (2 sizes
        // of 1 byte) at both ends.
        let sf = [hidden, 7, 7, shown_key, 9, 0xC1, 3, 2, 0xC1];
        assert_eq!(vp9_frames(&sf).map(|f| f.len()), Some(2));
        assert_eq!(show(&sf), Some(true));
        // Only the last frame's picture comes out of a packet.
        let shown_then_hidden = [shown_key, 9, hidden, 7, 7, 0xC1, 2, 3, 0xC1];
        assert_eq!(show(&shown_then_hidden), Some(false));
        // Two hidden frames: nothing shown.
        let both_hidden = [hidden, 7, 7, hidden, 9, 0xC1, 3, 2, 0xC1];
        assert_eq!(show(&both_hidden), Some(false));
        // Sizes past the index: unreadable.
        let bad = [hidden, 7, 7, shown_key, 9, 0xC1, 9, 2, 0xC1];
        assert_eq!(show(&bad), None);
        // A last byte that only looks like a marker: one plain frame.
        assert_eq!(show(&[shown_key, 0xC1]), Some(true));
        // Never dropped as unreferenced.
        assert!(!is_non_reference(&[hidden, 1], Codec::Vp9));
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
        assert_eq!(outputs_a_frame(&trail_n, one(2)), Some(true));
        assert_eq!(outputs_a_frame(&trail_r, one(0)), Some(true));
        assert_eq!(
            outputs_a_frame(&[0, 0, 0, 2, 0x40, 0x01], one(1)),
            Some(false)
        );
    }

    #[test]
    fn wanted_frames_with_a_margin() {
        let at = |n: u64| 1000 + n * 100;
        let plan = SkipPlan {
            active: true,
            clock: Some(FrameClock::Constant {
                pts0: 1000,
                frame_ns: 100.0,
            }),
            wanted: vec![10, 20],
            count_only: false,
            dropped: 0,
            counted_pts: Vec::new(),
            counted_untimed: false,
            dropped_pts: [at(3), at(4)].into(),
        };
        assert_eq!(plan.dropped_between(at(2), at(5)), 2);
        assert_eq!(plan.dropped_between(at(3), at(4)), 0);
        assert_eq!(plan.dropped_between(at(5), at(2)), 0);
        // A frame dropped again after a seek back is one frame.
        let mut again = plan.clone();
        again.dropped_pts.insert(at(3));
        assert_eq!(again.dropped_between(at(2), at(5)), 2);
        assert!(plan.wants(at(10)) && plan.wants(at(20)));
        assert!(plan.wants(at(9)) && plan.wants(at(21)));
        assert!(!plan.wants(at(15)) && !plan.wants(at(0)) && !plan.wants(at(30)));
        assert!(plan.wants(500)); // before frame 0: keep
    }
}
