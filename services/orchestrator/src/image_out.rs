//! Images out: f32 NHWC in [0, 1] -> 8-bit RGB PNGs or JPEGs with the generation parameters.

use candle_core::Tensor;
use sdmesh_core::{Error, Result};
use sdmesh_proto::v1;

/// How a job's images are encoded (the request's `image_format` and `jpeg_quality`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Png,
    /// Quality 1 to 100.
    Jpeg(u8),
}

/// JPEG quality when a request sets none (what most encoders and services default to).
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

impl Encoding {
    /// The request's encoding; INVALID_ARGUMENT for an unknown format, a quality outside 1 to
    /// 100, or a quality without JPEG.
    pub fn of(r: &v1::GenerateRequest) -> Result<Self> {
        let format = v1::ImageFormat::try_from(r.image_format)
            .map_err(|_| Error::invalid(format!("image_format: unknown value {}", r.image_format)))?;
        match (format, r.jpeg_quality) {
            (v1::ImageFormat::Unspecified | v1::ImageFormat::Png, None) => Ok(Self::Png),
            (v1::ImageFormat::Unspecified | v1::ImageFormat::Png, Some(_)) => {
                Err(Error::invalid("jpeg_quality: only JPEG output (image_format IMAGE_FORMAT_JPEG) takes a quality"))
            }
            (v1::ImageFormat::Jpeg, None) => Ok(Self::Jpeg(DEFAULT_JPEG_QUALITY)),
            (v1::ImageFormat::Jpeg, Some(q @ 1..=100)) => Ok(Self::Jpeg(q as u8)),
            (v1::ImageFormat::Jpeg, Some(q)) => Err(Error::invalid(format!(
                "jpeg_quality: {q} is not allowed; use 1 to 100 (unset = {DEFAULT_JPEG_QUALITY})"
            ))),
        }
    }

    /// Encodes each image, rounding like diffusers' `numpy_to_pil` ((x * 255).round(), half to
    /// even), with `parameters` inside.
    pub fn encode(self, images: &Tensor, parameters: &str) -> Result<Vec<Vec<u8>>> {
        let (n, h, w, c) = images.dims4()?;
        if c != 3 {
            return Err(Error::internal(format!("decoded images have {c} channels, expected 3")));
        }
        let bytes: Vec<u8> = sdmesh_core::images::nhwc_to_rgb8(&images.clamp(0f32, 1f32)?)?
            .into_iter()
            .flat_map(|i| i.into_raw())
            .collect();
        bytes
            .chunks_exact(h * w * 3)
            .take(n)
            .map(|pixels| match self {
                Self::Png => png(pixels, w as u32, h as u32, parameters),
                Self::Jpeg(quality) => jpeg(pixels, w as u32, h as u32, quality, parameters),
            })
            .collect()
    }
}

/// The parameters go in a text chunk named "parameters" (what A1111 and most tools read).
fn png(pixels: &[u8], width: u32, height: u32, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // tEXt is Latin-1; prompts beyond it go in an (UTF-8) iTXt chunk.
    if parameters.chars().all(|ch| (ch as u32) < 256) {
        encoder.add_text_chunk("parameters".into(), parameters.into()).map_err(Error::internal)?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into()).map_err(Error::internal)?;
    }
    let mut writer = encoder.write_header().map_err(Error::internal)?;
    writer.write_image_data(pixels).map_err(Error::internal)?;
    writer.finish().map_err(Error::internal)?;
    Ok(out)
}

/// The parameters go in a comment (COM) segment, UTF-8, after the JFIF header (what exiftool
/// and most viewers show as the comment); cut at 65533 bytes, a COM segment's most. No
/// parameters, no comment (previews).
fn jpeg(pixels: &[u8], width: u32, height: u32, quality: u8, parameters: &str) -> Result<Vec<u8>> {
    let mut encoded = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, quality)
        .encode(pixels, width, height, image::ExtendedColorType::Rgb8)
        .map_err(Error::internal)?;
    if parameters.is_empty() {
        return Ok(encoded);
    }
    // SOI, then APP0 (JFIF) with its length: the comment goes right after it.
    let after_jfif = match encoded.get(2..6) {
        Some([0xFF, 0xE0, hi, lo]) => 4 + u16::from_be_bytes([*hi, *lo]) as usize,
        _ => 2,
    };
    let mut text = parameters.as_bytes();
    if text.len() > 65533 {
        let mut end = 65533;
        while !parameters.is_char_boundary(end) {
            end -= 1;
        }
        text = &text[..end];
    }
    let mut out = Vec::with_capacity(encoded.len() + text.len() + 4);
    out.extend_from_slice(&encoded[..after_jfif]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((text.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(text);
    out.extend_from_slice(&encoded[after_jfif..]);
    Ok(out)
}

/// JPEG quality of live previews: small and quick to send.
const PREVIEW_QUALITY: u8 = 80;

/// A live preview, f32 [h, w, 3] in [0, 1], as a JPEG without parameters.
pub fn preview_jpeg(rgb: &Tensor) -> Result<Vec<u8>> {
    Ok(Encoding::Jpeg(PREVIEW_QUALITY).encode(&rgb.unsqueeze(0)?, "")?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tensor {
        Tensor::from_vec(vec![0f32, 0.5, 1.0, 0.25, 0.75, 0.1], (1, 1, 2, 3), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn round_trips_pixels_and_parameters() {
        let pngs = Encoding::Png.encode(&tiny(), "a cat\nSteps: 5, Seed: 1").unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&pngs[0]));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..6], &[0, 128, 255, 64, 191, 26]);
        let text = &reader.info().uncompressed_latin1_text;
        assert_eq!(text[0].keyword, "parameters");
        assert_eq!(text[0].text, "a cat\nSteps: 5, Seed: 1");
    }

    /// The COM segment's text, found by walking the segments from SOI to SOS.
    fn jpeg_comment(jpeg: &[u8]) -> Option<String> {
        let mut at = 2;
        while jpeg.get(at) == Some(&0xFF) && jpeg.get(at + 1) != Some(&0xDA) {
            let len = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
            if jpeg[at + 1] == 0xFE {
                return Some(String::from_utf8(jpeg[at + 4..at + 2 + len].to_vec()).unwrap());
            }
            at += 2 + len;
        }
        None
    }

    #[test]
    fn jpegs_decode_close_to_the_pixels_and_carry_the_parameters() {
        // A smooth 64x64 gradient: what JPEG keeps well.
        let (h, w) = (64usize, 64usize);
        let data: Vec<f32> = (0..h * w * 3).map(|i| ((i / 3) % w + (i / 3) / w) as f32 / (h + w) as f32).collect();
        let images = Tensor::from_vec(data, (1, h, w, 3), &candle_core::Device::Cpu).unwrap();
        let parameters = "ein Fuchs im Schnee, 雪の狐\nSteps: 5, Seed: 1";
        let jpeg = Encoding::Jpeg(90).encode(&images, parameters).unwrap().remove(0);
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        assert_eq!(&jpeg[2..4], &[0xFF, 0xE0], "JFIF stays right after SOI");
        assert_eq!(jpeg_comment(&jpeg).as_deref(), Some(parameters));
        let decoded = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (w as u32, h as u32));
        let png = Encoding::Png.encode(&images, parameters).unwrap().remove(0);
        let exact = image::load_from_memory(&png).unwrap().to_rgb8();
        let worst = exact.as_raw().iter().zip(decoded.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 8, "JPEG q90 differs by up to {worst}/255 on a smooth gradient");
        let smaller = Encoding::Jpeg(20).encode(&images, parameters).unwrap().remove(0);
        assert!(smaller.len() < jpeg.len());
        // A comment beyond a segment's room is cut at a character boundary.
        let long = "é".repeat(40_000);
        let cut = jpeg_comment(&Encoding::Jpeg(90).encode(&tiny(), &long).unwrap()[0]).unwrap();
        assert_eq!(cut.len(), 65532);
    }

    #[test]
    fn the_request_says_the_encoding() {
        let request = |format: v1::ImageFormat, quality: Option<u32>| v1::GenerateRequest {
            image_format: format.into(),
            jpeg_quality: quality,
            ..Default::default()
        };
        assert_eq!(Encoding::of(&request(v1::ImageFormat::Unspecified, None)).unwrap(), Encoding::Png);
        assert_eq!(Encoding::of(&request(v1::ImageFormat::Png, None)).unwrap(), Encoding::Png);
        assert_eq!(Encoding::of(&request(v1::ImageFormat::Jpeg, None)).unwrap(), Encoding::Jpeg(90));
        assert_eq!(Encoding::of(&request(v1::ImageFormat::Jpeg, Some(100))).unwrap(), Encoding::Jpeg(100));
        for bad in [request(v1::ImageFormat::Jpeg, Some(0)), request(v1::ImageFormat::Jpeg, Some(101))] {
            let e = Encoding::of(&bad).unwrap_err().to_string();
            assert!(e.contains("use 1 to 100"), "{e}");
        }
        let e = Encoding::of(&request(v1::ImageFormat::Png, Some(80))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let unknown = v1::GenerateRequest { image_format: 9, ..Default::default() };
        assert!(Encoding::of(&unknown).unwrap_err().to_string().contains("image_format"));
    }
}
