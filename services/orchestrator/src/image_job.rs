//! Jobs that start from an image: img2img, inpainting and depth2img, as diffusers'
//! StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline and
//! StableDiffusionDepth2ImgPipeline prepare them.
//!
//! What the three share with txt2img is the scheduler loop; what differs is set up here:
//! * the request's image (and mask) decoded and preprocessed like diffusers' VaeImageProcessor:
//!   resized (Lanczos) to the job's size, which defaults to the image's rounded down to a
//!   multiple of 8, then scaled to [-1, 1]; masks in greyscale, binarised at 0.5;
//! * `strength` cuts the schedule: int(steps * strength) steps run, from index
//!   (steps - that) * order (diffusers' `get_timesteps` + `set_begin_index`);
//! * the starting latents: the image's VAE sample noised to the first timestep
//!   (`scheduler.add_noise`); inpainting at strength 1 starts from pure noise instead;
//! * extra UNet input channels each step: the latent-size mask and the masked image's latents
//!   (9-channel inpainting UNet) or the normalised depth map (5-channel depth UNet); a 4-channel
//!   UNet inpaints by blending the re-noised image latents back outside the mask every step.
//!
//! Random draws happen in diffusers' order, from the job's noise source: the image's VAE sample
//! (when needed), the starting noise, then (inpainting) the masked image's VAE sample.

use crate::noise::NoiseSource;
use crate::scheduler::{self, Scheduler};
use candle_core::{DType, Device, Tensor};
use sdmesh_core::images::{self, Filter};
use sdmesh_core::{DepthEstimator, Error, Result, Vae};
use sdmesh_proto::v1;

/// img2img and depth2img default strength (diffusers' default); inpainting defaults to 1.
pub const DEFAULT_STRENGTH: f32 = 0.8;
pub const DEFAULT_INPAINT_STRENGTH: f32 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Txt2Img,
    Img2Img,
    Inpaint,
    Depth2Img,
    Upscale,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Txt2Img => "txt2img",
            Task::Img2Img => "img2img",
            Task::Inpaint => "inpaint",
            Task::Depth2Img => "depth2img",
            Task::Upscale => "upscale",
        }
    }

    /// The request's task, inferred when unspecified: a mask means inpainting, an image alone
    /// img2img, or depth2img on a depth checkpoint (5 UNet input channels), or upscaling on an
    /// upscaler.
    pub fn of(r: &v1::GenerateRequest, unet_in_channels: u32) -> Result<Task> {
        Ok(match v1::Task::try_from(r.task).map_err(|_| Error::invalid(format!("task: unknown value {}", r.task)))? {
            v1::Task::Txt2img => Task::Txt2Img,
            v1::Task::Img2img => Task::Img2Img,
            v1::Task::Inpaint => Task::Inpaint,
            v1::Task::Depth2img => Task::Depth2Img,
            v1::Task::Upscale => Task::Upscale,
            v1::Task::Unspecified if !r.mask.is_empty() => Task::Inpaint,
            v1::Task::Unspecified if r.image.is_empty() => Task::Txt2Img,
            v1::Task::Unspecified if unet_in_channels == DEPTH_UNET_CHANNELS => Task::Depth2Img,
            v1::Task::Unspecified if unet_in_channels == UPSCALER_UNET_CHANNELS => Task::Upscale,
            v1::Task::Unspecified => Task::Img2Img,
        })
    }
}

const DEPTH_UNET_CHANNELS: u32 = 5;
const INPAINT_UNET_CHANNELS: u32 = 9;
const UPSCALER_UNET_CHANNELS: u32 = 7;

/// A job's input image, preprocessed.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// f32 [1, 3, height, width] in [-1, 1], at the job's size.
    pub image: Tensor,
    /// The request's encoded image, for the depth estimator (which preprocesses it itself).
    pub encoded: bytes::Bytes,
    /// Inpainting: f32 [1, 1, height, width], 1 = repaint, 0 = keep.
    pub mask: Option<Tensor>,
    /// depth2img: the caller's depth map, f32 [1 or num_images, H, W].
    pub depth_map: Option<Tensor>,
    /// In (0, 1], as the request gave it (f32), and as the decimal diffusers would be given.
    pub strength: f32,
    /// Upscaling: the noise added to the low-resolution image (also the UNet's class label).
    pub noise_level: u32,
}

impl ImageInput {
    /// Diffusers computes int(steps * strength) with strength a Python float; the request's
    /// f32 is widened through its shortest decimal form (0.7f32 -> 0.7, not 0.69999998...)
    /// so that 10 steps at 0.7 run 7 steps, as they do there.
    pub fn strength_f64(&self) -> f64 {
        format!("{}", self.strength).parse().unwrap_or(f64::from(self.strength))
    }
}

/// Which UNet input channels a task needs, for errors that say what the checkpoint can do.
pub fn check_model_can(task: Task, unet_in_channels: u32, has_depth_estimator: bool, depth_given: bool) -> Result<()> {
    let what = match unet_in_channels {
        INPAINT_UNET_CHANNELS => "an inpainting checkpoint (9-channel UNet): it can only inpaint (send image and mask)",
        DEPTH_UNET_CHANNELS => "a depth checkpoint (5-channel UNet): it can only do depth2img (send an image)",
        UPSCALER_UNET_CHANNELS => "an x4 upscaler checkpoint (7-channel UNet): it can only upscale (send an image)",
        4 => {
            "a txt2img checkpoint (4-channel UNet): it does txt2img, img2img and inpainting by blending, not depth2img"
        }
        _ => "a checkpoint whose UNet input channels this orchestrator does not know",
    };
    let ok = match task {
        Task::Txt2Img | Task::Img2Img => unet_in_channels == 4,
        Task::Inpaint => unet_in_channels == 4 || unet_in_channels == INPAINT_UNET_CHANNELS,
        Task::Depth2Img => unet_in_channels == DEPTH_UNET_CHANNELS,
        Task::Upscale => unet_in_channels == UPSCALER_UNET_CHANNELS,
    };
    if !ok {
        return Err(Error::FailedPrecondition(format!(
            "{} is not possible with this model: it is {what}",
            task.name()
        )));
    }
    if task == Task::Depth2Img && !depth_given && !has_depth_estimator {
        return Err(Error::FailedPrecondition(
            "depth2img needs a depth map: this orchestrator has no depth service (start it with --depth-url) \
             and the request has no depth_map"
                .into(),
        ));
    }
    Ok(())
}

/// Decodes and preprocesses the request's image (and mask, depth map): returns the input and
/// the job's (height, width). `size` is the request's height/width (each optional); unset
/// sides take the image's, rounded down to a multiple of `f`.
pub fn prepare_input(
    task: Task,
    r: &v1::GenerateRequest,
    size: (Option<u32>, Option<u32>),
    f: u32,
    max_side: u32,
) -> Result<(ImageInput, usize, usize)> {
    if r.image.is_empty() {
        return Err(Error::invalid(format!("image: {} needs an image (PNG or JPEG bytes)", task.name())));
    }
    let max_input_pixels = 4 * max_side as u64 * max_side as u64;
    let decoded =
        images::decode_rgb_limited(&r.image, max_input_pixels).map_err(|e| Error::invalid(format!("image: {e}")))?;
    let (iw, ih) = decoded.dimensions();
    if task == Task::Upscale {
        return prepare_upscale_input(r, decoded, size, f, max_side);
    }
    if r.noise_level.is_some() {
        return Err(Error::invalid(format!("noise_level: only upscaling takes a noise level, not {}", task.name())));
    }
    let side = |name: &str, given: Option<u32>, image_side: u32| -> Result<u32> {
        let v = given.unwrap_or(image_side - image_side % f);
        if v == 0 || !v.is_multiple_of(f) || v > max_side {
            return Err(Error::invalid(match given {
                Some(_) => format!("{name}: {v} is not allowed; use a multiple of {f} from {f} to {max_side}"),
                None => format!(
                    "image: its {name} of {image_side} px gives {v}; the output must be a multiple of {f} from {f} \
                     to {max_side} (set {name} to resize the image)"
                ),
            }));
        }
        Ok(v)
    };
    let height = side("height", size.0, ih)?;
    let width = side("width", size.1, iw)?;
    let resized = if (width, height) == (iw, ih) {
        decoded
    } else {
        images::resize_rgb(&decoded, width, height, Filter::Lanczos)
    };
    let image = images::to_tensor_nchw(&resized).affine(2.0, -1.0)?;

    let mask = if task == Task::Inpaint {
        if r.mask.is_empty() {
            return Err(Error::invalid("mask: inpainting needs a mask (PNG or JPEG; white = repaint)"));
        }
        let m = images::decode_luma(&r.mask).map_err(|e| Error::invalid(format!("mask: {e}")))?;
        if m.dimensions() != (iw, ih) {
            return Err(Error::invalid(format!(
                "mask: {}x{} px, but the image is {iw}x{ih}; send a mask of the image's size",
                m.width(),
                m.height()
            )));
        }
        let m = if (width, height) == (iw, ih) { m } else { images::resize_luma(&m, width, height, Filter::Lanczos) };
        // diffusers' mask processor: [0, 1], then binarised (< 0.5 -> 0, >= 0.5 -> 1).
        Some(images::luma_to_tensor(&m).ge(0.5f32)?.to_dtype(DType::F32)?)
    } else {
        if !r.mask.is_empty() {
            return Err(Error::invalid(format!("mask: only inpainting takes a mask, not {}", task.name())));
        }
        None
    };

    let depth_map = match (&r.depth_map, task) {
        (None, _) => None,
        (Some(t), Task::Depth2Img) => {
            let d = t.to_candle("depth_map", &Device::Cpu)?.to_dtype(DType::F32)?;
            let ok = matches!(d.dims(), &[n, h, w] if n >= 1 && h >= 1 && w >= 1 && h as u32 <= 4 * max_side && w as u32 <= 4 * max_side);
            if !ok {
                return Err(Error::invalid(format!(
                    "depth_map: shape {:?}; expected [1 or num_images, height, width]",
                    d.dims()
                )));
            }
            Some(d)
        }
        (Some(_), task) => {
            return Err(Error::invalid(format!("depth_map: only depth2img takes a depth map, not {}", task.name())))
        }
    };

    let default = if task == Task::Inpaint { DEFAULT_INPAINT_STRENGTH } else { DEFAULT_STRENGTH };
    let strength = r.strength.unwrap_or(default);
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid(format!("strength: {strength} is not allowed; use 0 < strength <= 1")));
    }
    let input = ImageInput { image, encoded: r.image.clone(), mask, depth_map, strength, noise_level: 0 };
    Ok((input, height as usize, width as usize))
}

/// Smallest input side an upscale takes: the UNet halves its latents three times.
pub const MIN_UPSCALE_SIDE: u32 = 8;

/// An upscale's input: the image at its size rounded down to a multiple of `f` (resized
/// bicubic, as the upscale pipeline's image processor does), in [-1, 1]; the output is `f`
/// times larger and must fit `max_side`.
fn prepare_upscale_input(
    r: &v1::GenerateRequest,
    decoded: image::RgbImage,
    size: (Option<u32>, Option<u32>),
    f: u32,
    max_side: u32,
) -> Result<(ImageInput, usize, usize)> {
    if size != (None, None) || r.strength.is_some() || !r.mask.is_empty() || r.depth_map.is_some() {
        return Err(Error::invalid(
            "height, width, strength, mask and depth_map do not apply to upscaling (the output is 4x the image)",
        ));
    }
    let (iw, ih) = decoded.dimensions();
    let (w, h) = (iw - iw % f, ih - ih % f);
    if w < MIN_UPSCALE_SIDE || h < MIN_UPSCALE_SIDE {
        return Err(Error::invalid(format!(
            "image: {iw}x{ih} px is too small to upscale; each side must be at least {MIN_UPSCALE_SIDE} px"
        )));
    }
    if w * f > max_side || h * f > max_side {
        return Err(Error::invalid(format!(
            "image: {iw}x{ih} px upscales to {}x{}, above this orchestrator's largest side {max_side} (--max-side); \
             send an image of at most {} px a side",
            w * f,
            h * f,
            max_side / f
        )));
    }
    let resized = if (w, h) == (iw, ih) { decoded } else { images::resize_rgb(&decoded, w, h, Filter::Bicubic) };
    let image = images::to_tensor_nchw(&resized).affine(2.0, -1.0)?;
    let noise_level = r.noise_level.unwrap_or(crate::upscale::DEFAULT_NOISE_LEVEL);
    let input = ImageInput { image, encoded: r.image.clone(), mask: None, depth_map: None, strength: 1.0, noise_level };
    Ok((input, (h * f) as usize, (w * f) as usize))
}

/// diffusers' `get_timesteps`: the index of the first timestep to run (t_start * order), for
/// `steps` inference steps at `strength`. None when that leaves no step to run.
pub fn begin_index(steps: usize, strength: f64, order: usize) -> Option<usize> {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    (init_timestep >= 1).then(|| (steps - init_timestep) * order)
}

/// What a job with an input image adds to the scheduler loop.
pub struct Prepared {
    /// The latents the loop starts from.
    pub latents: Tensor,
    /// Concatenated to the scaled model input on the channel axis every step.
    pub extra_channels: Option<Tensor>,
    /// 4-channel inpainting: blend the image back outside the mask after every step.
    pub blend: Option<Blend>,
}

pub struct Blend {
    /// [n, 1, h, w], 1 = repaint.
    pub mask: Tensor,
    /// The image's latents, [n, c, h, w].
    pub image_latents: Tensor,
    /// The starting noise, re-applied to the image latents at each next timestep.
    pub noise: Tensor,
}

impl Blend {
    /// After the step at index `index` (of `len` timesteps): (1 - mask) * image latents noised
    /// to the next timestep (or clean after the last) + mask * latents.
    pub fn apply(&self, scheduler: &dyn Scheduler, latents: &Tensor, index: usize, len: usize) -> Result<Tensor> {
        let proper = if index + 1 < len {
            scheduler::add_noise(scheduler, &self.image_latents, &self.noise, index + 1)?
        } else {
            self.image_latents.clone()
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        Ok((proper.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
}

/// The job's shape, for preparing its latents.
pub struct Shape {
    pub num_images: usize,
    pub latent_channels: usize,
    /// Latent height and width.
    pub h: usize,
    pub w: usize,
    pub unet_in_channels: u32,
}

/// Repeats a [1, ...] tensor to `n` rows.
fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if rows == n {
        return Ok(t.clone());
    }
    let mut reps = vec![1; t.rank()];
    reps[0] = n / rows;
    Ok(t.repeat(reps.as_slice())?)
}

/// The VAE sample of `image` ([1, 3, H, W]), drawing its noise from `noise` as diffusers'
/// `latent_dist.sample(generator)` does.
async fn vae_sample(vae: &dyn Vae, image: &Tensor, shape: &Shape, noise: &mut dyn NoiseSource) -> Result<Tensor> {
    let eps = noise.randn(&[image.dim(0)?, shape.latent_channels, shape.h, shape.w])?;
    let encoded = vae.encode(image.clone(), Some(eps)).await?;
    encoded.sample.ok_or_else(|| Error::internal("the vae returned no sample"))
}

/// The depth condition: each predicted (or given) map resized (bicubic) to the latent size and
/// normalised to [-1, 1] per image, [n, 1, h, w].
pub async fn depth_condition(input: &ImageInput, depth: Option<&dyn DepthEstimator>, shape: &Shape) -> Result<Tensor> {
    let maps = match (&input.depth_map, depth) {
        (Some(d), _) => d.clone(),
        (None, Some(estimator)) => {
            let maps = estimator.estimate(vec![input.encoded.clone()]).await?;
            let map = maps.into_iter().next().ok_or_else(|| Error::internal("the depth service returned no map"))?;
            map.unsqueeze(0)?
        }
        (None, None) => return Err(Error::FailedPrecondition("depth2img needs a depth map or a depth service".into())),
    };
    let resized = images::interpolate_bicubic(&maps.unsqueeze(1)?, shape.h, shape.w)?;
    let n = resized.dim(0)?;
    let flat = resized.flatten_from(1)?;
    let min = flat.min_keepdim(1)?.reshape((n, 1, 1, 1))?;
    let max = flat.max_keepdim(1)?.reshape((n, 1, 1, 1))?;
    // 2 * (d - min) / (max - min) - 1, in diffusers' order of operations.
    let normalised = ((resized.broadcast_sub(&min)? * 2.0)?.broadcast_div(&(max - &min)?)? - 1.0)?;
    if !shape.num_images.is_multiple_of(n) {
        return Err(Error::invalid(format!(
            "depth_map: {n} maps do not divide num_images {}; send 1 or num_images maps",
            shape.num_images
        )));
    }
    repeat_rows(&normalised, shape.num_images)
}

/// Sets up the loop for an image job: the scheduler's begin index is set, and the returned
/// latents and extra channels are what the first step gets.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    task: Task,
    input: &ImageInput,
    shape: &Shape,
    scheduler: &mut dyn Scheduler,
    begin: usize,
    vae: &dyn Vae,
    depth: Option<&dyn DepthEstimator>,
    noise: &mut dyn NoiseSource,
) -> Result<Prepared> {
    scheduler.set_begin_index(begin);
    let latent_shape = [shape.num_images, shape.latent_channels, shape.h, shape.w];
    match task {
        Task::Img2Img | Task::Depth2Img => {
            // depth2img prepares its depth map first (no draws there).
            let extra_channels =
                if task == Task::Depth2Img { Some(depth_condition(input, depth, shape).await?) } else { None };
            let image_latents = repeat_rows(&vae_sample(vae, &input.image, shape, noise).await?, shape.num_images)?;
            let eps = noise.randn(&latent_shape)?;
            let latents = scheduler::add_noise(scheduler, &image_latents, &eps, begin)?;
            Ok(Prepared { latents, extra_channels, blend: None })
        }
        Task::Inpaint => {
            let mask = input.mask.as_ref().ok_or_else(|| Error::invalid("mask: inpainting needs a mask"))?;
            let blending = shape.unet_in_channels == 4;
            let strength_max = input.strength == 1.0;
            let image_latents = if blending || !strength_max {
                Some(repeat_rows(&vae_sample(vae, &input.image, shape, noise).await?, shape.num_images)?)
            } else {
                None
            };
            let eps = noise.randn(&latent_shape)?;
            let latents = match (&image_latents, strength_max) {
                (Some(image_latents), false) => scheduler::add_noise(scheduler, image_latents, &eps, begin)?,
                _ => (&eps * scheduler.init_noise_sigma())?,
            };
            let latent_mask = repeat_rows(&images::interpolate_nearest(mask, shape.h, shape.w)?, shape.num_images)?;
            // The masked image: the image where the mask keeps it, 0 where it repaints.
            let keep = mask.lt(0.5f32)?.to_dtype(DType::F32)?;
            let masked_image = input.image.broadcast_mul(&keep)?;
            let masked_latents = repeat_rows(&vae_sample(vae, &masked_image, shape, noise).await?, shape.num_images)?;
            if blending {
                let image_latents = image_latents.ok_or_else(|| Error::internal("no image latents to blend"))?;
                Ok(Prepared {
                    latents,
                    extra_channels: None,
                    blend: Some(Blend { mask: latent_mask, image_latents, noise: eps }),
                })
            } else {
                Ok(Prepared {
                    latents,
                    extra_channels: Some(Tensor::cat(&[latent_mask, masked_latents], 1)?),
                    blend: None,
                })
            }
        }
        Task::Upscale => Err(Error::internal("upscaling is prepared by prepare_upscale")),
        Task::Txt2Img => Err(Error::internal("txt2img has no input image")),
    }
}

/// Sets up an upscale: the low-resolution image noised (first draw) as the extra channels,
/// then the starting latents of its size (second draw) times the scheduler's sigma.
pub fn prepare_upscale(
    input: &ImageInput,
    upscaler: &crate::upscale::Upscaler,
    num_images: usize,
    latent_channels: usize,
    scheduler: &dyn Scheduler,
    noise: &mut dyn NoiseSource,
) -> Result<Prepared> {
    let noised = upscaler.noised_image(&input.image, input.noise_level, noise)?;
    let (_, _, h, w) = noised.dims4()?;
    let latents = (noise.randn(&[num_images, latent_channels, h, w])? * scheduler.init_noise_sigma())?;
    Ok(Prepared { latents, extra_channels: Some(repeat_rows(&noised, num_images)?), blend: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_index_is_diffusers_get_timesteps() {
        assert_eq!(begin_index(10, 1.0, 1), Some(0));
        assert_eq!(begin_index(10, 0.7, 1), Some(3));
        assert_eq!(begin_index(10, 0.7, 2), Some(6));
        assert_eq!(begin_index(50, 0.75, 1), Some(13)); // int(37.5) = 37
        assert_eq!(begin_index(4, 0.2, 1), None);
    }

    #[test]
    fn strength_widens_through_its_decimal() {
        let input = |s: f32| ImageInput {
            image: Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap(),
            encoded: bytes::Bytes::new(),
            mask: None,
            depth_map: None,
            strength: s,
            noise_level: 0,
        };
        assert_eq!(input(0.7).strength_f64(), 0.7);
        // 10 * 0.7f32 as f64 would be 6.99999988: 6 steps instead of diffusers' 7.
        assert_eq!(begin_index(10, input(0.7).strength_f64(), 1), Some(3));
        assert_eq!(input(1.0).strength_f64(), 1.0);
    }
}
