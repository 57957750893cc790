//! Driver for `tools/reference/cv2_resize_check.py`, which compares [`Cv2Linear`] with
//! `cv2.resize(..., INTER_LINEAR)` byte for byte. Reads cases from stdin until EOF; each case is
//! nine little-endian u32 (src_h, src_w, dst_h, dst_w, top, left, h, w, pad)
//! followed by the whole source image (src_h*src_w*3 bytes). For each case it
//! copies only `source_window` of the image into a buffer whose rows have
//! `pad` extra pixels of garbage, runs `resize_region` on it, and writes the
//! window as four u32 (r0, r1, c0, c1) followed by the h*w*3 output bytes.
use std::io::{self, Read, Write};
use vjepa_ingest::Cv2Linear;

fn main() -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    loop {
        let mut hdr = [0u8; 36];
        match stdin.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let f: Vec<usize> = hdr
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        let (sh, sw, dh, dw, top, left, h, w, pad) =
            (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]);
        let mut src = vec![0u8; sh * sw * 3];
        stdin.read_exact(&mut src)?;

        let r = Cv2Linear::new(sh, sw, dh, dw);
        let ((r0, r1), (c0, c1)) = r.source_window(top, left, h, w);
        let stride = (c1 - c0 + pad) * 3;
        let mut win = vec![0x5Au8; (r1 - r0) * stride];
        for y in r0..r1 {
            let s = (y * sw + c0) * 3;
            let d = (y - r0) * stride;
            win[d..d + (c1 - c0) * 3].copy_from_slice(&src[s..s + (c1 - c0) * 3]);
        }
        let mut out = vec![0u8; h * w * 3];
        r.resize_region(&win, stride, (r0, c0), top, left, h, w, &mut out);
        for v in [r0, r1, c0, c1] {
            stdout.write_all(&(v as u32).to_le_bytes())?;
        }
        stdout.write_all(&out)?;
        stdout.flush()?;
    }
}
