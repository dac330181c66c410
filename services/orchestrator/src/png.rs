//! Images out: f32 NHWC in [0, 1] -> 8-bit RGB PNGs with the generation parameters.

use candle_core::Tensor;
use sdmesh_core::{Error, Result};

/// One PNG per image, rounding like diffusers' `numpy_to_pil` ((x * 255).round(), half to
/// even). The parameters go in a text chunk named "parameters" (what A1111 and most tools read).
pub fn encode_pngs(images: &Tensor, parameters: &str) -> Result<Vec<Vec<u8>>> {
    let (n, h, w, c) = images.dims4()?;
    if c != 3 {
        return Err(Error::internal(format!("decoded images have {c} channels, expected 3")));
    }
    let bytes: Vec<u8> =
        sdmesh_core::images::nhwc_to_rgb8(&images.clamp(0f32, 1f32)?)?.into_iter().flat_map(|i| i.into_raw()).collect();
    bytes
        .chunks_exact(h * w * 3)
        .take(n)
        .map(|pixels| {
            let mut out = Vec::new();
            let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
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
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_pixels_and_parameters() {
        let img =
            Tensor::from_vec(vec![0f32, 0.5, 1.0, 0.25, 0.75, 0.1], (1, 1, 2, 3), &candle_core::Device::Cpu).unwrap();
        let pngs = encode_pngs(&img, "a cat\nSteps: 5, Seed: 1").unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&pngs[0]));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..6], &[0, 128, 255, 64, 191, 26]);
        let text = &reader.info().uncompressed_latin1_text;
        assert_eq!(text[0].keyword, "parameters");
        assert_eq!(text[0].text, "a cat\nSteps: 5, Seed: 1");
    }
}
