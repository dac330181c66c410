//! Image I/O and resampling that reproduce what the Python reference stack does, bit for bit
//! where that is possible:
//!
//! * decoding: PIL's `Image.open(f).convert("RGB")` / `.convert("L")` (what diffusers'
//!   `load_image` and `VaeImageProcessor` and transformers' image processors start from);
//! * [`resize_rgb`] / [`resize_luma`]: PIL's `Image.resize((w, h), resample)` on 8-bit images
//!   (libImaging/Resample.c; `Geometry.c` for NEAREST), bit-exact;
//! * [`interpolate_bicubic`] / [`interpolate_bilinear`] / [`interpolate_nearest`]: torch's
//!   `F.interpolate` CPU kernels on float32 NCHW tensors, bit-exact with torch 2.15's AVX2 /
//!   AVX-512 build (same index/weight computation in f32, same fused multiply-adds and order);
//! * [`png16`]: a depth map as a 16-bit greyscale PNG.
//!
//! Decoding uses the `image` crate (PNG via the `png` crate, JPEG via `zune-jpeg`), built with only
//! the "png" and "jpeg" features: both are pure Rust (no C libraries to build or to patch for
//! CVEs), they read every PNG colour type / bit depth and baseline + progressive JPEG, and they let
//! us read the header (dimensions) before allocating pixels. We do **not** use `image`'s colour
//! conversions or resizing: PIL's differ (16-bit -> 8-bit, RGB -> L, resampling filters), so those
//! are written out here after PIL's C code. Not applied, as PIL's `open`/`convert` doesn't either:
//! EXIF orientation, ICC profiles, gamma (gAMA/cHRM/sRGB chunks). (diffusers' `load_image` does
//! apply `ImageOps.exif_transpose` before converting; that is not done here.) CMYK JPEGs are
//! converted by zune-jpeg, not checked against PIL.
//!
//! JPEG: `zune-jpeg`'s IDCT and chroma upsampling are not libjpeg-turbo's (which PIL uses), so
//! JPEG pixels can differ from PIL's by a few levels (the fixtures measure at most 3 of 255);
//! PNG decoding is exact.

use std::io::Cursor;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, RgbImage};

use crate::{Error, Result};

/// The default pixel limit of [`decode_rgb`] / [`decode_luma`]: 8192 x 8192 = 64 Mpixel (at most
/// 512 MiB decoded, for 16-bit RGBA), far above any Stable Diffusion input.
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

// ------------------------------------------------------------------------------------------------
// Decoding

/// Decodes a PNG or JPEG to 8-bit RGB exactly as PIL's `Image.open(f).convert("RGB")` does (JPEG:
/// up to a few levels off, see the module docs): alpha is dropped (not composited), greyscale is
/// replicated, palettes are expanded, 16-bit samples become 8-bit as PIL does it (16-bit RGB(A)
/// and grey+alpha keep the high byte; 16-bit grey without alpha is *clipped* to 0..=255, PIL's
/// `I;16` -> `RGB`). Rejects images over [`DEFAULT_MAX_PIXELS`].
///
/// Errors are `INVALID_ARGUMENT`: empty input, a format other than PNG/JPEG, a decoding error (the
/// message names the format and the decoder's error), too many pixels.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb_limited(bytes, DEFAULT_MAX_PIXELS)
}

/// [`decode_rgb`] with its own pixel limit (width x height), checked from the header before any
/// pixel is decoded, so a small file claiming a huge image costs nothing.
pub fn decode_rgb_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let (img, grey16) = decode(bytes, max_pixels)?;
    to_rgb_like_pil(img, grey16)
}

/// [`decode_rgb_limited`], plus the image's alpha (8-bit, one per pixel; 16-bit alpha keeps its
/// high byte) when it has transparency: an alpha channel or a PNG tRNS chunk (which the decoder
/// expands into one), what PIL reports as an "A" band or `info["transparency"]`. One decode.
pub fn decode_rgb_and_alpha_limited(bytes: &[u8], max_pixels: u64) -> Result<(RgbImage, Option<Vec<u8>>)> {
    let (img, grey16) = decode(bytes, max_pixels)?;
    let alpha: Option<Vec<u8>> = match &img {
        DynamicImage::ImageRgba8(i) => Some(i.pixels().map(|p| p.0[3]).collect()),
        DynamicImage::ImageLumaA8(i) => Some(i.pixels().map(|p| p.0[1]).collect()),
        DynamicImage::ImageRgba16(i) => Some(i.pixels().map(|p| hi(p.0[3])).collect()),
        DynamicImage::ImageLumaA16(i) => Some(i.pixels().map(|p| hi(p.0[1])).collect()),
        _ => None,
    };
    Ok((to_rgb_like_pil(img, grey16)?, alpha))
}

/// Decodes a PNG or JPEG to 8-bit greyscale exactly as PIL's `Image.open(f).convert("L")` (for
/// inpainting masks): colour uses PIL's ITU-R 601-2 luma in fixed point,
/// `L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16` (the generator script checks it against PIL
/// for all 2^24 colours; the textbook `(299 R + 587 G + 114 B) / 1000`, rounded, differs for 9040
/// of them), alpha is dropped, 16-bit as in [`decode_rgb`]. Same errors and limit as [`decode_rgb`].
pub fn decode_luma(bytes: &[u8]) -> Result<GrayImage> {
    decode_luma_limited(bytes, DEFAULT_MAX_PIXELS)
}

/// [`decode_luma`] with its own pixel limit.
pub fn decode_luma_limited(bytes: &[u8], max_pixels: u64) -> Result<GrayImage> {
    let (img, grey16) = decode(bytes, max_pixels)?;
    to_luma_like_pil(img, grey16)
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        other => other.extensions_str().first().copied().unwrap_or("unknown"),
    }
}

/// Decodes to the decoder's own pixel layout; also says whether the file is a 16-bit greyscale PNG
/// without alpha channel (PIL's `I;16`, clipped to 8 bits rather than shifted), which the decoder
/// turns into grey+alpha when it has a tRNS chunk.
fn decode(bytes: &[u8], max_pixels: u64) -> Result<(DynamicImage, bool)> {
    if bytes.is_empty() {
        return Err(Error::invalid("the image is empty (0 bytes); expected a PNG or JPEG file"));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Error::invalid(format!(
            "the image data ({} bytes, starting {}) is not a recognised image format; expected a PNG or JPEG file",
            bytes.len(),
            head.join(" ")
        ))
    })?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(Error::invalid(format!(
            "{} images are not supported; send a PNG or JPEG file",
            format_name(format).to_uppercase()
        )));
    }
    let name = format_name(format);
    let fail = |e: image::ImageError| {
        Error::invalid(format!("cannot decode the {name} image ({} bytes): {}", bytes.len(), e.to_string().trim_end()))
    };
    // zune-jpeg (in image's lenient mode) fills in a JPEG whose scan data is cut short; PIL
    // refuses it ("image file is truncated"), and so do we.
    if format == ImageFormat::Jpeg && !jpeg_has_end(bytes) {
        return Err(Error::invalid(format!(
            "cannot decode the JPEG image ({} bytes): it is truncated (no end-of-image marker after the last scan)",
            bytes.len()
        )));
    }

    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    // image's default limits (512 MiB for the decoder's own allocations, e.g. PNG text chunks).
    reader.limits(image::Limits::default());
    // Reads the header only (PNG: up to the first IDAT; JPEG: the markers before the scan).
    let decoder = reader.into_decoder().map_err(fail)?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(Error::invalid(format!("the {name} image is empty ({w}x{h} pixels)")));
    }
    if pixels > max_pixels {
        return Err(Error::invalid(format!(
            "the {name} image is {w}x{h} = {pixels} pixels, more than the {max_pixels} allowed"
        )));
    }
    // IHDR is the first chunk (the decoder checked): bit depth at byte 24, colour type at 25.
    let grey16 = format == ImageFormat::Png && bytes.get(24..26) == Some(&[16, 0][..]);
    let img = DynamicImage::from_decoder(decoder).map_err(fail)?;
    Ok((img, grey16))
}

/// Whether an EOI marker (FF D9) follows the last start-of-scan marker (FF DA). Neither can occur
/// inside entropy-coded data (an FF there is always followed by 00 or a restart marker).
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return true; // no scan at all: let the decoder say what is wrong
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// High byte of a 16-bit sample: PIL's `;16B` raw modes (16-bit RGB, RGBA, LA PNGs).
#[inline]
fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

/// PIL's `I;16` -> 8-bit conversion (16-bit grey PNGs): clip, don't scale.
#[inline]
fn clip16(v: u16) -> u8 {
    v.min(255) as u8
}

/// PIL's RGB -> L (Convert.c `L24`).
#[inline]
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8
}

/// Maps each `C`-sample pixel of `raw` to `N` bytes.
fn convert<const C: usize, const N: usize, T: Copy>(raw: &[T], f: impl Fn(&[T]) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / C * N);
    for px in raw.chunks_exact(C) {
        out.extend_from_slice(&f(px));
    }
    out
}

fn to_rgb_like_pil(img: DynamicImage, grey16: bool) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageRgb8(i) => return Ok(i),
        DynamicImage::ImageLuma8(i) => convert::<1, 3, _>(i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(i) => convert::<2, 3, _>(i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgba8(i) => convert::<4, 3, _>(i.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma16(i) => convert::<1, 3, _>(i.as_raw(), |p| [clip16(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) if grey16 => convert::<2, 3, _>(i.as_raw(), |p| [clip16(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) => convert::<2, 3, _>(i.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageRgb16(i) => convert::<3, 3, _>(i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        DynamicImage::ImageRgba16(i) => convert::<4, 3, _>(i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])]),
        other => {
            return Err(Error::invalid(format!("unsupported pixel format {:?}", other.color())));
        }
    };
    RgbImage::from_raw(w, h, data).ok_or_else(|| Error::internal("decoded image has the wrong size"))
}

fn to_luma_like_pil(img: DynamicImage, grey16: bool) -> Result<GrayImage> {
    let (w, h) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageLuma8(i) => return Ok(i),
        DynamicImage::ImageLumaA8(i) => convert::<2, 1, _>(i.as_raw(), |p| [p[0]]),
        DynamicImage::ImageRgb8(i) => convert::<3, 1, _>(i.as_raw(), |p| [luma(p[0], p[1], p[2])]),
        DynamicImage::ImageRgba8(i) => convert::<4, 1, _>(i.as_raw(), |p| [luma(p[0], p[1], p[2])]),
        DynamicImage::ImageLuma16(i) => convert::<1, 1, _>(i.as_raw(), |p| [clip16(p[0])]),
        DynamicImage::ImageLumaA16(i) if grey16 => convert::<2, 1, _>(i.as_raw(), |p| [clip16(p[0])]),
        DynamicImage::ImageLumaA16(i) => convert::<2, 1, _>(i.as_raw(), |p| [hi(p[0])]),
        DynamicImage::ImageRgb16(i) => convert::<3, 1, _>(i.as_raw(), |p| [luma(hi(p[0]), hi(p[1]), hi(p[2]))]),
        DynamicImage::ImageRgba16(i) => convert::<4, 1, _>(i.as_raw(), |p| [luma(hi(p[0]), hi(p[1]), hi(p[2]))]),
        other => {
            return Err(Error::invalid(format!("unsupported pixel format {:?}", other.color())));
        }
    };
    GrayImage::from_raw(w, h, data).ok_or_else(|| Error::internal("decoded image has the wrong size"))
}

// ------------------------------------------------------------------------------------------------
// PIL resampling

/// PIL's resampling filters (`PIL.Image.Resampling`), as used by [`resize_rgb`] / [`resize_luma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `NEAREST`: PIL's affine nearest neighbour (source x = floor((x + 0.5) * in / out), with the
    /// position accumulated in f64 as Geometry.c does).
    Nearest,
    /// `BILINEAR`: triangle filter, support 1 (scaled by the downscale factor).
    Bilinear,
    /// `BICUBIC`: cubic convolution with a = -0.5, support 2 (scaled by the downscale factor).
    Bicubic,
    /// `LANCZOS`: sinc windowed by sinc, a = 3, support 3 (scaled by the downscale factor).
    Lanczos,
}

impl Filter {
    /// The filter a `preprocessor_config.json` names by PIL number (`resample`): 0 nearest,
    /// 1 lanczos, 2 bilinear, 3 bicubic; the others (box, hamming) are not implemented.
    pub fn from_pil(resample: u32) -> std::result::Result<Self, String> {
        match resample {
            0 => Ok(Filter::Nearest),
            1 => Ok(Filter::Lanczos),
            2 => Ok(Filter::Bilinear),
            3 => Ok(Filter::Bicubic),
            other => {
                Err(format!("resample {other}: supported are 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic)"))
            }
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The filter kernels of Resample.c, same operation order (all f64).
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Resample.c's PRECISION_BITS: 8 bits for the result, 2 for overflow (sums of filter
/// coefficients can exceed 1 or be negative).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis of a PIL resample: for each output index, the first source index, the number of
/// source pixels, and `ksize` fixed-point coefficients.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of Resample.c (box = the whole image).
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; the result is clamped to >= 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xmax = xmax.clamp(0, ksize as i64) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            *wx = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for (x, &wx) in w.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            k[xx * ksize + x] = if v < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin as usize, xmax));
    }
    Coeffs { ksize, bounds, k }
}

/// Resample.c's `clip8`: drop the fraction (arithmetic shift, i.e. floor) and clamp.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `resize` on an interleaved 8-bit image of `ch` channels (`ImagingResampleInner`, or
/// `ImagingScaleAffine` for NEAREST).
fn resize_raw(src: &[u8], ch: usize, in_w: usize, in_h: usize, out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    if out_w == 0 || out_h == 0 {
        return Vec::new();
    }
    if in_w == 0 || in_h == 0 {
        return vec![0; out_w * out_h * ch];
    }
    if in_w == out_w && in_h == out_h {
        return src.to_vec(); // PIL: `self.copy()`
    }
    if filter == Filter::Nearest {
        return nearest_affine(src, ch, in_w, in_h, out_w, out_h);
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    // Pillow 13 (read from its compiled ImagingResampleInner, checked against it) runs the vertical pass
    // first when both are needed and the height shrinks by more pixels than twice the width does
    // (older Pillows always went horizontal first); the order changes the intermediate rounding.
    let vertical_first = need_h && need_v && {
        let dy = in_h as i64 - out_h as i64;
        dy > 0 && dy > 2 * (in_w as i64 - out_w as i64)
    };
    let hpass = |img: &[u8], rows: usize| {
        resample_horizontal(img, ch, in_w, rows, out_w, &precompute_coeffs(in_w, out_w, filter))
    };
    let vpass =
        |img: &[u8], width: usize| resample_vertical(img, ch, width, out_h, &precompute_coeffs(in_h, out_h, filter));
    match (need_h, need_v) {
        (true, false) => hpass(src, in_h),
        (false, true) => vpass(src, in_w),
        _ if vertical_first => hpass(&vpass(src, in_w), out_h),
        _ => vpass(&hpass(src, in_h), out_w),
    }
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `ImagingResampleHorizontal_8bpc`: `rows` rows of `in_w` pixels -> rows of `out_w`.
fn resample_horizontal(src: &[u8], ch: usize, in_w: usize, rows: usize, out_w: usize, co: &Coeffs) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * ch];
    for (row, orow) in src.chunks_exact(in_w * ch).zip(out.chunks_exact_mut(out_w * ch)) {
        for xx in 0..out_w {
            let (xmin, xmax) = co.bounds[xx];
            let k = &co.k[xx * co.ksize..xx * co.ksize + xmax];
            for c in 0..ch {
                let mut ss = HALF;
                for (x, &kx) in k.iter().enumerate() {
                    ss += i32::from(row[(x + xmin) * ch + c]) * kx;
                }
                orow[xx * ch + c] = clip8(ss);
            }
        }
    }
    debug_assert_eq!(src.len(), in_w * rows * ch);
    out
}

/// `ImagingResampleVertical_8bpc`: rows of `width` pixels -> `out_h` rows.
fn resample_vertical(src: &[u8], ch: usize, width: usize, out_h: usize, co: &Coeffs) -> Vec<u8> {
    let stride = width * ch;
    let mut out = vec![0u8; out_h * stride];
    for (yy, orow) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, ymax) = co.bounds[yy];
        let k = &co.k[yy * co.ksize..yy * co.ksize + ymax];
        for (i, o) in orow.iter_mut().enumerate() {
            let mut ss = HALF;
            for (y, &ky) in k.iter().enumerate() {
                ss += i32::from(src[(y + ymin) * stride + i]) * ky;
            }
            *o = clip8(ss);
        }
    }
    out
}

/// Geometry.c `ImagingScaleAffine` (what `resize(..., NEAREST)` runs): source positions start at
/// half a step and accumulate by repeated f64 addition, truncated to an index.
fn nearest_affine(src: &[u8], ch: usize, in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let a0 = in_w as f64 / out_w as f64;
    let a4 = in_h as f64 / out_h as f64;
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut xin = vec![None; out_w];
    let mut xo = a0 * 0.5;
    for x in xin.iter_mut() {
        let i = coord(xo);
        if (0..in_w as i64).contains(&i) {
            *x = Some(i as usize);
        }
        xo += a0;
    }
    let mut out = vec![0u8; out_w * out_h * ch];
    let mut yo = a4 * 0.5;
    for y in 0..out_h {
        let yi = coord(yo);
        if (0..in_h as i64).contains(&yi) {
            let row = &src[yi as usize * in_w * ch..(yi as usize + 1) * in_w * ch];
            for (x, xi) in xin.iter().enumerate() {
                if let Some(xi) = xi {
                    out[(y * out_w + x) * ch..(y * out_w + x + 1) * ch].copy_from_slice(&row[xi * ch..(xi + 1) * ch]);
                }
            }
        }
        yo += a4;
    }
    out
}

/// PIL's `img.resize((width, height), filter)` for an RGB image (reducing_gap None, no box):
/// bit-exact with Pillow 13's separable fixed-point resampler (Resample.c: filter support scaled by
/// the downscale factor, weights normalised then rounded to 22-bit fixed point, 8-bit result per
/// pass with rounding and clipping; horizontal pass then vertical, except vertical first when both
/// change and `in_h - height > max(0, 2 * (in_w - width))`, as Pillow 13 decides; a pass whose size
/// doesn't change is skipped; same size -> a copy). NEAREST is Pillow's affine nearest (Geometry.c). A zero
/// `width`/`height` gives an empty image (PIL raises instead); an empty source gives black.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = img.dimensions();
    let data = resize_raw(img.as_raw(), 3, w as usize, h as usize, width as usize, height as usize, filter);
    RgbImage::from_raw(width, height, data).expect("resize output has the requested size")
}

/// [`resize_rgb`] for a greyscale ("L") image.
pub fn resize_luma(img: &GrayImage, width: u32, height: u32, filter: Filter) -> GrayImage {
    let (w, h) = img.dimensions();
    let data = resize_raw(img.as_raw(), 1, w as usize, h as usize, width as usize, height as usize, filter);
    GrayImage::from_raw(width, height, data).expect("resize output has the requested size")
}

// ------------------------------------------------------------------------------------------------
// Tensors

/// An RGB image as an f32 tensor [1, 3, h, w] in [0, 1] (`x / 255`), on the CPU.
/// diffusers' `numpy_to_pil` for float NHWC images in [0, 1]: `(x * 255).round().astype("uint8")`
/// in float32, numpy's round being half to even. `data` is one image, h * w * 3 values in [0, 1]
/// (outside, the cast saturates).
pub fn quantize_like_numpy_to_pil(data: &[f32], height: usize, width: usize) -> RgbImage {
    let raw: Vec<u8> = data.iter().map(|&x| (x * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(width as u32, height as u32, raw).expect("h * w * 3 values")
}

/// A per-channel setting of an image processor config (`image_mean`, `image_std`): one value
/// for all three channels, or one each.
pub fn per_channel(values: &[f64], what: &str) -> std::result::Result<[f32; 3], String> {
    match *values {
        [x] => Ok([x as f32; 3]),
        [a, b, c] => Ok([a as f32, b as f32, c as f32]),
        _ => Err(format!("{what} must have 1 or 3 entries, got {}", values.len())),
    }
}

/// Every image of a float NHWC [0, 1] batch, 8-bit as [`quantize_like_numpy_to_pil`].
pub fn nhwc_to_rgb8(images: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (n, h, w, c) = images.dims4()?;
    if c != 3 {
        candle_core::bail!("images have {c} channels, expected 3");
    }
    let data = images.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..n).map(|i| quantize_like_numpy_to_pil(&data[i * h * w * 3..(i + 1) * h * w * 3], h, w)).collect())
}

pub fn to_tensor_nchw(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = f32::from(px[c]) / 255.0;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu).expect("shape matches the data")
}

/// A greyscale image as an f32 tensor [1, 1, h, w] in [0, 1] (`x / 255`), on the CPU.
pub fn luma_to_tensor(img: &GrayImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_vec(data, (1, 1, h, w), &Device::Cpu).expect("shape matches the data")
}

// ------------------------------------------------------------------------------------------------
// torch F.interpolate (CPU, float32, no antialias, size given, no scale_factor)
//
// torch's CPU kernels live in ATen/native/cpu/UpSampleKernel.cpp, which is compiled per CPU
// capability; in the AVX2 / AVX-512 builds GCC contracts `a * b + c` into fused multiply-adds. The
// exact grouping below (which products are fused, in which order) was found by matching torch
// 2.15's output bit for bit (tests/fixtures/generate_images.py records torch's capability,
// AVX512 there; AVX2 uses the same code with the same contractions). With
// `ATEN_CPU_CAPABILITY=default` (no FMA) torch itself rounds differently, by about 1 ulp.

/// Input as contiguous f32 on the CPU plus its dims.
fn nchw(t: &Tensor, out_h: usize, out_w: usize, what: &str) -> candle_core::Result<(Vec<f32>, [usize; 4])> {
    let (n, c, h, w) = t.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("{what}: input {h}x{w} and output {out_h}x{out_w} must both be non-empty");
    }
    let data = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((data, [n, c, h, w]))
}

fn finish(out: Vec<f32>, n: usize, c: usize, oh: usize, ow: usize, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu)?.to_device(like.device())
}

/// torch's `area_pixel_compute_scale<float>` with no explicit scale: `in / out` (or
/// `(in - 1) / (out - 1)` with align_corners), in f32.
fn area_scale(in_size: usize, out_size: usize, align_corners: bool) -> f32 {
    if align_corners {
        if out_size > 1 {
            (in_size - 1) as f32 / (out_size - 1) as f32
        } else {
            0.0
        }
    } else {
        in_size as f32 / out_size as f32
    }
}

/// torch's `area_pixel_compute_source_index<float>`: `scale * dst` with align_corners, else
/// `scale * (dst + 0.5) - 0.5` (fused into one FMA when `fused`), clamped to 0 except for cubic.
fn source_index(scale: f32, dst: usize, align_corners: bool, cubic: bool, fused: bool) -> f32 {
    if align_corners {
        return scale * dst as f32;
    }
    let half = dst as f32 + 0.5;
    let src = if fused { scale.mul_add(half, -0.5) } else { scale * half - 0.5 };
    if !cubic && src < 0.0 {
        0.0
    } else {
        src
    }
}

/// torch's `guard_index_and_lambda`: (floor index clamped to the last one, fraction in [0, 1]).
fn guard_index_and_lambda(real: f32, in_size: usize) -> (i64, f32) {
    let index = (real.floor() as i64).min(in_size as i64 - 1);
    let lambda = (real - index as f32).clamp(0.0, 1.0);
    (index, lambda)
}

/// `F.interpolate(t, size=(out_h, out_w), mode="nearest")`: torch's legacy nearest (not
/// "nearest-exact"), source index `min(floor(dst * s), in - 1)` with `s = in / out` and the product
/// in f32. `t`: [n, c, h, w], any float dtype (computed in f32); result f32 on `t`'s device.
/// Bit-exact (a gather).
pub fn interpolate_nearest(t: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    let (x, [n, c, h, w]) = nchw(t, out_h, out_w, "interpolate_nearest")?;
    let idx = |in_size: usize, out_size: usize| -> Vec<usize> {
        let scale = area_scale(in_size, out_size, false);
        (0..out_size).map(|i| ((scale * i as f32).floor() as usize).min(in_size - 1)).collect()
    };
    let (hi, wi) = (idx(h, out_h), idx(w, out_w));
    let mut out = Vec::with_capacity(n * c * out_h * out_w);
    for plane in x.chunks_exact(h * w) {
        for &sy in &hi {
            let row = &plane[sy * w..(sy + 1) * w];
            out.extend(wi.iter().map(|&sx| row[sx]));
        }
    }
    finish(out, n, c, out_h, out_w, t)
}

/// Bilinear (index0, index1, weight0, weight1) of one axis (torch's
/// `compute_source_index_and_lambda`; same size -> identity).
fn linear_axis(in_size: usize, out_size: usize, align_corners: bool, fused: bool) -> Vec<(usize, usize, f32, f32)> {
    let scale = area_scale(in_size, out_size, align_corners);
    (0..out_size)
        .map(|i| {
            if in_size == out_size {
                return (i, i, 1.0, 0.0);
            }
            let real = source_index(scale, i, align_corners, false, fused);
            let (i0, l1) = guard_index_and_lambda(real, in_size);
            let i0 = i0 as usize;
            let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// `F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=...)` (no antialias).
/// `t`: [n, c, h, w], any float dtype (computed in f32); result f32 on `t`'s device.
///
/// torch picks one of two CPU kernels for a contiguous NCHW float tensor, and they round
/// differently; both are reproduced: for small outputs (out_h + out_w <= 128) the channels-last
/// kernel (corner weights `h_l * w_l` first, then a fused chain over the 4 corners), otherwise the
/// generic one (a 2-tap sum along the width for both rows, then along the height). Bit-exact for
/// fewer than 8 channels; with 8 or more, torch's small-output kernel switches to SIMD
/// (unfused, other order) and results may differ by ~1 ulp.
pub fn interpolate_bilinear(
    t: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> candle_core::Result<Tensor> {
    let (x, [n, c, h, w]) = nchw(t, out_h, out_w, "interpolate_bilinear")?;
    let small = out_h + out_w <= 128;
    // The channels-last kernel's source index is fused, the generic kernel's is not.
    let hs = linear_axis(h, out_h, align_corners, small);
    let ws = linear_axis(w, out_w, align_corners, small);
    let mut out = Vec::with_capacity(n * c * out_h * out_w);
    for plane in x.chunks_exact(h * w) {
        for &(h0, h1, hl0, hl1) in &hs {
            let (r0, r1) = (&plane[h0 * w..(h0 + 1) * w], &plane[h1 * w..(h1 + 1) * w]);
            for &(w0, w1, wl0, wl1) in &ws {
                let v = if small {
                    let (w00, w01, w10, w11) = (hl0 * wl0, hl0 * wl1, hl1 * wl0, hl1 * wl1);
                    r1[w1].mul_add(w11, r1[w0].mul_add(w10, r0[w0].mul_add(w00, r0[w1] * w01)))
                } else {
                    let t0 = r0[w0].mul_add(wl0, r0[w1] * wl1);
                    let t1 = r1[w0].mul_add(wl0, r1[w1] * wl1);
                    t0.mul_add(hl0, t1 * hl1)
                };
                out.push(v);
            }
        }
    }
    finish(out, n, c, out_h, out_w, t)
}

/// torch's `get_cubic_upsample_coefficients` (A = -0.75) for fraction `t`, in f32, fused as torch's
/// build fuses `cubic_convolution1` / `cubic_convolution2`.
fn cubic_coeffs(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    // ((A + 2) x - (A + 3)) x x + 1, for |x| <= 1
    let conv1 = |x: f32| (A + 2.0).mul_add(x, -(A + 3.0)) * x * x + 1.0;
    // ((A x - 5A) x + 8A) x - 4A, for 1 < |x| < 2
    let conv2 = |x: f32| A.mul_add(x, -5.0 * A).mul_add(x, 8.0 * A) * x - 4.0 * A;
    [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2((1.0 - t) + 1.0)]
}

/// Bicubic indices (clamped to the image) and weights of one axis.
fn cubic_axis(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = area_scale(in_size, out_size, false);
    (0..out_size)
        .map(|i| {
            let real = source_index(scale, i, false, true, true);
            let (index, lambda) = guard_index_and_lambda(real, in_size);
            let idx = std::array::from_fn(|j| (index - 1 + j as i64).clamp(0, in_size as i64 - 1) as usize);
            (idx, cubic_coeffs(lambda))
        })
        .collect()
}

/// torch's 4-tap accumulation as compiled: `fma(v3, k3, fma(v2, k2, fma(v0, k0, v1 * k1)))`.
#[inline]
fn sum4(v: [f32; 4], k: &[f32; 4]) -> f32 {
    v[3].mul_add(k[3], v[2].mul_add(k[2], v[0].mul_add(k[0], v[1] * k[1])))
}

/// `F.interpolate(t, size=(out_h, out_w), mode="bicubic", align_corners=False)` (no antialias):
/// cubic convolution with A = -0.75, source positions `(dst + 0.5) * in / out - 0.5`, the 4x4
/// neighbourhood clamped at the borders, in f32 in torch's order (a 4-tap sum along the width for
/// each of the 4 rows, then the 4-tap sum of those along the height). Like torch's, the output can
/// overshoot the input range. `t`: [n, c, h, w], any float dtype (computed in f32); result f32 on
/// `t`'s device. Bit-exact against torch 2.15 (AVX2/AVX-512 build).
pub fn interpolate_bicubic(t: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    let (x, [n, c, h, w]) = nchw(t, out_h, out_w, "interpolate_bicubic")?;
    let hs = cubic_axis(h, out_h);
    let ws = cubic_axis(w, out_w);
    let mut out = Vec::with_capacity(n * c * out_h * out_w);
    for plane in x.chunks_exact(h * w) {
        for (hi, hw) in &hs {
            let rows: [&[f32]; 4] = std::array::from_fn(|r| &plane[hi[r] * w..(hi[r] + 1) * w]);
            for (wi, ww) in &ws {
                let tap = |r: &[f32]| sum4([r[wi[0]], r[wi[1]], r[wi[2]], r[wi[3]]], ww);
                out.push(sum4([tap(rows[0]), tap(rows[1]), tap(rows[2]), tap(rows[3])], hw));
            }
        }
    }
    finish(out, n, c, out_h, out_w, t)
}

// ------------------------------------------------------------------------------------------------
// Encoding

/// A depth map (f32 [h, w], any float dtype, any device) as a 16-bit greyscale PNG: values mapped
/// linearly from min..max to 0..65535, `round((v - min) / (max - min) * 65535)` in f64 (halves away
/// from zero), so min -> 0 and max -> 65535; a constant map gives all 0. Non-finite values are an
/// internal error (a broken model), as is a shape that is not 2-D and non-empty.
pub fn png16(depth: &Tensor) -> Result<Vec<u8>> {
    let (h, w) = depth.dims2().map_err(|e| Error::internal(format!("png16 needs a [h, w] tensor: {e}")))?;
    if h == 0 || w == 0 {
        return Err(Error::internal(format!("png16: the depth map is empty ({h}x{w})")));
    }
    let values = depth.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::internal("png16: the depth map has NaN or infinite values"));
    }
    let (min, max) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (min, range) = (f64::from(min), f64::from(max) - f64::from(min));
    let mut samples = Vec::with_capacity(values.len() * 2);
    for &v in &values {
        let q =
            if range > 0.0 { ((f64::from(v) - min) / range * 65535.0).round().clamp(0.0, 65535.0) as u16 } else { 0 };
        samples.extend_from_slice(&q.to_be_bytes());
    }
    encode_png(w, h, png::ColorType::Grayscale, png::BitDepth::Sixteen, &samples)
}

/// An 8-bit RGB image as a PNG (default compression, no filtering choices exposed).
pub fn encode_png_rgb8(img: &RgbImage) -> Result<Vec<u8>> {
    encode_png(img.width() as usize, img.height() as usize, png::ColorType::Rgb, png::BitDepth::Eight, img.as_raw())
}

fn encode_png(w: usize, h: usize, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Result<Vec<u8>> {
    let (w32, h32) = (u32::try_from(w), u32::try_from(h));
    let (Ok(w32), Ok(h32)) = (w32, h32) else {
        return Err(Error::internal(format!("image too large for PNG: {w}x{h}")));
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w32, h32);
    encoder.set_color(color);
    encoder.set_depth(depth);
    let mut writer = encoder.write_header().map_err(|e| Error::internal(format!("PNG encoding failed: {e}")))?;
    writer.write_image_data(data).map_err(|e| Error::internal(format!("PNG encoding failed: {e}")))?;
    writer.finish().map_err(|e| Error::internal(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}
