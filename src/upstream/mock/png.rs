//! A real PNG of any size that stays a small file: one colour, a 1-bit palette image, so
//! that its pixel data is all zero bytes, which deflate squeezes to about 1/150th.

/// The mock's one colour (an orange), the PNG's palette.
const COLOUR: [u8; 3] = [0xE8, 0x6A, 0x1C];

/// A `width` x `height` PNG, every pixel [`COLOUR`].
pub fn solid(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 1, colour type 3 (palette), deflate, no filter method, no interlace.
    ihdr.extend_from_slice(&[1, 3, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"PLTE", &COLOUR);
    // Each row: filter byte 0, then one bit per pixel, all palette index 0.
    let row = 1 + u64::from(width).div_ceil(8);
    chunk(&mut png, b"IDAT", &zlib_zeros(row * u64::from(height)));
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    png.extend_from_slice(&len.to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zlib stream of `n` zero bytes: one deflate block with the fixed Huffman codes, a
/// literal zero, then copies of 258 bytes from one back, then the rest as literals.
fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut out = Bits::default();
    out.bytes.extend_from_slice(&[0x78, 0x01]);
    out.put(1, 1); // the last block
    out.put(1, 2); // fixed Huffman codes
    let literal_zero = |out: &mut Bits| out.code(0b0011_0000, 8);
    let mut left = n;
    if left > 0 {
        literal_zero(&mut out);
        left -= 1;
    }
    while left >= 258 {
        out.code(0b1100_0101, 8); // length code 285: 258 bytes
        out.code(0, 5); // distance code 0: one back
        left -= 258;
    }
    for _ in 0..left {
        literal_zero(&mut out);
    }
    out.code(0, 7); // end of block
    let mut bytes = out.finish();
    // Adler-32 of zeros: the sum stays 1, the sum of sums grows by 1 per byte.
    let b = u32::try_from(n % 65_521).unwrap_or(0);
    bytes.extend_from_slice(&((b << 16) | 1).to_be_bytes());
    bytes
}

/// Deflate's bit order: values least significant bit first, Huffman codes most first.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    current: u8,
    used: u8,
}

impl Bits {
    fn put(&mut self, value: u32, count: u8) {
        for i in 0..count {
            self.bit((value >> i) & 1 == 1);
        }
    }

    fn code(&mut self, code: u32, count: u8) {
        for i in (0..count).rev() {
            self.bit((code >> i) & 1 == 1);
        }
    }

    fn bit(&mut self, set: bool) {
        if set {
            self.current |= 1 << self.used;
        }
        self.used += 1;
        if self.used == 8 {
            self.bytes.push(self.current);
            self.current = 0;
            self.used = 0;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.bytes.push(self.current);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_iend_is_the_known_one() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn a_large_image_is_a_small_file() {
        let png = solid(3840, 2160);
        assert_eq!(&png[16..24], &[0, 0, 15, 0, 0, 0, 8, 112]);
        assert!(png.len() < 8 * 1024, "{} bytes", png.len());
    }
}
