//! Error types: why a video is refused ([`QuarantineReason`]) and the crate error ([`IngestError`]).

use std::fmt;

/// Why a video is refused (quarantined) instead of being decoded.
///
/// A stable, small vocabulary: [`QuarantineReason::as_str`] gives the snake_case word stored in
/// Parquet records. Do not rename the words; add new variants at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuarantineReason {
    /// The object has zero bytes.
    EmptyFile,
    /// Type finding failed (the bytes are not a known media container), or the bytes are a
    /// still image (PNG, JPEG, …) rather than a video.
    NotAVideo,
    /// A known container, but no decoder / demuxer for its video stream is installed (or the
    /// decoded format cannot be converted to RGB).
    UnsupportedFormat,
    /// The container holds no video stream (e.g. an audio-only file).
    NoVideoStream,
    /// The container could not be parsed (e.g. an MP4 whose `moov` index is missing).
    DemuxError,
    /// The video decoder (or a later element) reported an error.
    DecodeError,
    /// The stream ended well before the length the container announces (cut-off upload).
    Truncated,
    /// The stream ended before any frame was decoded.
    NoFrames,
    /// Decoding did not finish within [`crate::DecoderOptions::deadline`].
    Timeout,
    /// A frame is larger than [`crate::DecoderOptions::max_pixels`] (or the clip would not fit
    /// in memory).
    TooLarge,
    /// The object could not be read from its store (missing, permission, short read).
    FetchError,
}

impl QuarantineReason {
    /// Every reason, in declaration order.
    pub const ALL: [QuarantineReason; 11] = [
        QuarantineReason::EmptyFile,
        QuarantineReason::NotAVideo,
        QuarantineReason::UnsupportedFormat,
        QuarantineReason::NoVideoStream,
        QuarantineReason::DemuxError,
        QuarantineReason::DecodeError,
        QuarantineReason::Truncated,
        QuarantineReason::NoFrames,
        QuarantineReason::Timeout,
        QuarantineReason::TooLarge,
        QuarantineReason::FetchError,
    ];

    /// The stable snake_case word for this reason (as stored in Parquet records).
    pub fn as_str(&self) -> &'static str {
        match self {
            QuarantineReason::EmptyFile => "empty_file",
            QuarantineReason::NotAVideo => "not_a_video",
            QuarantineReason::UnsupportedFormat => "unsupported_format",
            QuarantineReason::NoVideoStream => "no_video_stream",
            QuarantineReason::DemuxError => "demux_error",
            QuarantineReason::DecodeError => "decode_error",
            QuarantineReason::Truncated => "truncated",
            QuarantineReason::NoFrames => "no_frames",
            QuarantineReason::Timeout => "timeout",
            QuarantineReason::TooLarge => "too_large",
            QuarantineReason::FetchError => "fetch_error",
        }
    }

    /// Parses a word produced by [`QuarantineReason::as_str`].
    pub fn from_str_opt(word: &str) -> Option<QuarantineReason> {
        QuarantineReason::ALL
            .into_iter()
            .find(|r| r.as_str() == word)
    }
}

impl fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The input video is refused: record it and move on (never retry the same bytes).
    #[error("{reason}: {detail}")]
    Quarantine {
        /// Why, from a small stable vocabulary.
        reason: QuarantineReason,
        /// Human-readable detail (GStreamer's message, sizes, …).
        detail: String,
    },
    /// Not the input's fault: a missing GStreamer plugin/element in this installation, an I/O
    /// error writing samples, a bug. Retrying the same input will fail the same way.
    #[error("fatal ingest error: {0}")]
    Fatal(String),
    /// Not the input's fault either, but passing: the store could not be read (a timeout, a
    /// network error, a server error after the store's retries). The object itself may be
    /// fine: try another, and this one again later; never quarantine it for this.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Not the input's fault: the object was replaced while it was read (the store answered a
    /// read for another version than the one opened). Its new version may be fine: read it
    /// again, never quarantine it for this.
    #[error("object changed while reading: {0}")]
    Changed(String),
}

impl IngestError {
    /// Shorthand for [`IngestError::Quarantine`].
    pub fn quarantine(reason: QuarantineReason, detail: impl Into<String>) -> Self {
        IngestError::Quarantine {
            reason,
            detail: detail.into(),
        }
    }

    /// The quarantine reason, if this is a quarantine.
    pub fn quarantine_reason(&self) -> Option<QuarantineReason> {
        match self {
            IngestError::Quarantine { reason, .. } => Some(*reason),
            IngestError::Fatal(_) | IngestError::Unavailable(_) | IngestError::Changed(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_words_are_stable_and_round_trip() {
        let words: Vec<&str> = QuarantineReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            words,
            [
                "empty_file",
                "not_a_video",
                "unsupported_format",
                "no_video_stream",
                "demux_error",
                "decode_error",
                "truncated",
                "no_frames",
                "timeout",
                "too_large",
                "fetch_error"
            ]
        );
        for r in QuarantineReason::ALL {
            assert_eq!(QuarantineReason::from_str_opt(r.as_str()), Some(r));
        }
        assert_eq!(QuarantineReason::from_str_opt("nope"), None);
        let e = IngestError::quarantine(QuarantineReason::Truncated, "cut at 1 KiB");
        assert_eq!(e.to_string(), "truncated: cut at 1 KiB");
        assert_eq!(e.quarantine_reason(), Some(QuarantineReason::Truncated));
        assert_eq!(IngestError::Fatal("x".into()).quarantine_reason(), None);
    }

    #[test]
    fn decoder_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<crate::Decoder>();
        assert_send::<IngestError>();
    }
}
