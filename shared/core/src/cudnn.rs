//! 2D convolutions on CUDA in f16/bf16 through cuDNN, with f32 accumulation.
//!
//! candle 0.11.1's CUDA convolution writes the im2col matrix (9x the input for a 3x3 kernel:
//! 1.4 GB for one of the VAE's 128-channel convolutions at 768x768 in f16), multiplies it, then
//! copies the product from NHWC to NCHW. candle's optional `cudnn` feature computes f16 in f16
//! (cuDNN's `TRUE_HALF` configuration, which rules out most tensor-core kernels) and allocates
//! and zeroes a fresh workspace on every call. Here cuDNN runs on the NCHW tensors directly:
//! - compute type f32 for f16 and bf16 (PyTorch's choice), tensor-core math;
//! - the algorithm from cuDNN's heuristics (`cudnnGetConvolutionForwardAlgorithm_v7`: the
//!   best-ranked one that fits [`MAX_WORKSPACE`]), chosen once per shape with its descriptors;
//! - one workspace per CUDA stream, grown when a shape needs more, never zeroed;
//! - the bias added in place (`cudnnAddTensor`).
//!
//! The library is opened at run time (`libcudnn.so.9`, else `libcudnn.so`), so a binary built
//! with the `cuda` feature starts without it and keeps candle's convolutions, saying so once.
//! f32 on CUDA keeps candle's convolutions (no TF32 question), and so does
//! `SDMESH_CUDNN_CONV=0` (for comparing).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn as nn;

/// Largest workspace one convolution may take (cuDNN's fastest algorithms for large maps can
/// ask for several GB; the next-ranked one then runs).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_WORKSPACE: usize = 1 << 30;

/// Whether CUDA convolutions may use cuDNN: a build with the `cuda` feature, and
/// SDMESH_CUDNN_CONV not set to 0. Read once.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda") && crate::switched_on(&ENABLED, "SDMESH_CUDNN_CONV")
}

/// Whether convolutions of `dtype` on `device` run on cuDNN: [`enabled`], a CUDA device, f16
/// or bf16, and the library opened (the first call tries to open it).
pub fn active(device: &candle_core::Device, dtype: DType) -> bool {
    #[cfg(feature = "cuda")]
    {
        device.is_cuda() && matches!(dtype, DType::F16 | DType::BF16) && enabled() && cuda::api().is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, dtype);
        false
    }
}

/// The cuDNN version opened (e.g. 91000 for 9.10.0), if one was (see [`active`]).
pub fn version() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        cuda::opened_version()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// `conv.forward(x)`, on cuDNN where [`active`] (ungrouped convolutions with a bias: every one
/// in SD 2.x; others keep candle's). Where cuDNN fails (no algorithm for a shape, say),
/// candle's convolution runs instead and [`fallbacks`] counts it: a job is not lost to it.
pub fn conv2d(conv: &nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (Some(bias), 1) = (conv.bias(), conv.config().groups) {
        if active(x.device(), x.dtype()) {
            match cuda::conv2d(conv, bias, x) {
                Ok(y) => return Ok(y),
                Err(e) => fell_back(&e),
            }
        }
    }
    conv.forward(x)
}

static FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Convolutions cuDNN failed on so far in this process (each then ran on candle's).
pub fn fallbacks() -> u64 {
    FALLBACKS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn fell_back(e: &candle_core::Error) {
    let earlier = FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if earlier < 8 {
        tracing::warn!("cuDNN convolution failed, candle's runs instead: {e}");
    }
}

/// One entry of cuDNN's ranked list of algorithms for a convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Candidate {
    algo: i32,
    /// 0: cuDNN can run it for this shape.
    status: i32,
    math_type: i32,
}

/// The best-ranked candidate cuDNN can run whose workspace (`workspace_of`; `None` where
/// cuDNN cannot say) is at most `max_workspace` bytes, with that workspace.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn pick(
    candidates: &[Candidate],
    mut workspace_of: impl FnMut(&Candidate) -> Option<usize>,
    max_workspace: usize,
) -> Option<(Candidate, usize)> {
    candidates
        .iter()
        .filter(|c| c.status == 0)
        .find_map(|c| workspace_of(c).filter(|&bytes| bytes <= max_workspace).map(|bytes| (*c, bytes)))
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // calls into cuDNN with device pointers
mod cuda {
    use super::{pick, Candidate, MAX_WORKSPACE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
    use candle_nn as nn;
    use std::collections::HashMap;
    use std::ffi::{c_char, c_int, c_void};
    use std::sync::{Arc, LazyLock, Mutex, OnceLock};

    type Handle = *mut c_void;
    type Desc = *mut c_void;
    type Status = c_int;

    // cudnn.h values, the same in cuDNN 8 and 9.
    const NCHW: c_int = 0;
    const CROSS_CORRELATION: c_int = 1;
    const DATA_FLOAT: c_int = 0;
    const DATA_HALF: c_int = 2;
    const DATA_BFLOAT16: c_int = 9;
    const TENSOR_OP_MATH: c_int = 1;
    /// CUDNN_CONVOLUTION_FWD_ALGO_COUNT.
    const ALGO_COUNT: usize = 8;
    /// Shapes whose descriptors a stream keeps (each a few hundred bytes of host memory).
    const MAX_PLANS: usize = 1024;

    /// cudnnConvolutionFwdAlgoPerf_t.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct FwdAlgoPerf {
        algo: c_int,
        status: c_int,
        time: f32,
        memory: usize,
        determinism: c_int,
        math_type: c_int,
        reserved: [c_int; 3],
    }

    /// The cuDNN entry points used here.
    pub(super) struct Api {
        version: usize,
        create: unsafe extern "C" fn(*mut Handle) -> Status,
        set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
        error_string: unsafe extern "C" fn(Status) -> *const c_char,
        create_tensor: unsafe extern "C" fn(*mut Desc) -> Status,
        set_tensor_4d: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
        destroy_tensor: unsafe extern "C" fn(Desc) -> Status,
        create_filter: unsafe extern "C" fn(*mut Desc) -> Status,
        set_filter_4d: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
        destroy_filter: unsafe extern "C" fn(Desc) -> Status,
        create_conv: unsafe extern "C" fn(*mut Desc) -> Status,
        set_conv_2d: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
        set_math_type: unsafe extern "C" fn(Desc, c_int) -> Status,
        destroy_conv: unsafe extern "C" fn(Desc) -> Status,
        get_algorithms:
            unsafe extern "C" fn(Handle, Desc, Desc, Desc, Desc, c_int, *mut c_int, *mut FwdAlgoPerf) -> Status,
        workspace_size: unsafe extern "C" fn(Handle, Desc, Desc, Desc, Desc, c_int, *mut usize) -> Status,
        forward: unsafe extern "C" fn(
            Handle,
            *const c_void,
            Desc,
            *const c_void,
            Desc,
            *const c_void,
            Desc,
            c_int,
            *mut c_void,
            usize,
            *const c_void,
            Desc,
            *mut c_void,
        ) -> Status,
        add_tensor: unsafe extern "C" fn(
            Handle,
            *const c_void,
            Desc,
            *const c_void,
            *const c_void,
            Desc,
            *mut c_void,
        ) -> Status,
        /// Kept open for the functions above.
        _library: libloading::Library,
    }

    fn load() -> std::result::Result<Api, String> {
        // SAFETY: opening cuDNN runs its initialisers, which have no preconditions.
        let library = ["libcudnn.so.9", "libcudnn.so"]
            .iter()
            .find_map(|&name| unsafe { libloading::Library::new(name) }.ok())
            .ok_or("neither libcudnn.so.9 nor libcudnn.so is on the library path")?;
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the type each symbol is read as is its declaration in cudnn.h.
                *unsafe { library.get($name) }
                    .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(&$name[..$name.len() - 1])))?
            };
        }
        let get_version: unsafe extern "C" fn() -> usize = symbol!(b"cudnnGetVersion\0");
        // SAFETY: cudnnGetVersion takes nothing and only reads a constant.
        let version = unsafe { get_version() };
        if version < 8000 {
            return Err(format!("cuDNN {version} is too old: 8 or later is needed"));
        }
        let create = symbol!(b"cudnnCreate\0");
        let set_stream = symbol!(b"cudnnSetStream\0");
        let error_string = symbol!(b"cudnnGetErrorString\0");
        let create_tensor = symbol!(b"cudnnCreateTensorDescriptor\0");
        let set_tensor_4d = symbol!(b"cudnnSetTensor4dDescriptor\0");
        let destroy_tensor = symbol!(b"cudnnDestroyTensorDescriptor\0");
        let create_filter = symbol!(b"cudnnCreateFilterDescriptor\0");
        let set_filter_4d = symbol!(b"cudnnSetFilter4dDescriptor\0");
        let destroy_filter = symbol!(b"cudnnDestroyFilterDescriptor\0");
        let create_conv = symbol!(b"cudnnCreateConvolutionDescriptor\0");
        let set_conv_2d = symbol!(b"cudnnSetConvolution2dDescriptor\0");
        let set_math_type = symbol!(b"cudnnSetConvolutionMathType\0");
        let destroy_conv = symbol!(b"cudnnDestroyConvolutionDescriptor\0");
        let get_algorithms = symbol!(b"cudnnGetConvolutionForwardAlgorithm_v7\0");
        let workspace_size = symbol!(b"cudnnGetConvolutionForwardWorkspaceSize\0");
        let forward = symbol!(b"cudnnConvolutionForward\0");
        let add_tensor = symbol!(b"cudnnAddTensor\0");
        Ok(Api {
            version,
            create,
            set_stream,
            error_string,
            create_tensor,
            set_tensor_4d,
            destroy_tensor,
            create_filter,
            set_filter_4d,
            destroy_filter,
            create_conv,
            set_conv_2d,
            set_math_type,
            destroy_conv,
            get_algorithms,
            workspace_size,
            forward,
            add_tensor,
            _library: library,
        })
    }

    /// cuDNN, opened on first use; `None` (said once) where it cannot be.
    static API: OnceLock<Option<Api>> = OnceLock::new();

    pub(super) fn api() -> Option<&'static Api> {
        API.get_or_init(|| match load() {
            Ok(api) => {
                tracing::info!(version = api.version, "cuDNN opened: f16/bf16 CUDA convolutions run on it");
                Some(api)
            }
            Err(e) => {
                tracing::warn!("cuDNN not available ({e}): CUDA convolutions use candle's");
                None
            }
        })
        .as_ref()
    }

    pub(super) fn opened_version() -> Option<usize> {
        API.get().and_then(|api| api.as_ref()).map(|api| api.version)
    }

    fn check(api: &Api, status: Status, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: cudnnGetErrorString returns a static NUL-terminated string for any status.
        let message = unsafe { std::ffi::CStr::from_ptr((api.error_string)(status)) }.to_string_lossy();
        candle_core::bail!("cuDNN {what}: {message} (status {status})")
    }

    fn int(v: usize) -> Result<c_int> {
        c_int::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cuDNN convolution: {v} is too large")))
    }

    /// A convolution: input, weights and output as [n, c, h, w] / [k, c, r, s] / [n, k, p, q].
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Shapes {
        data_type: c_int,
        x: [usize; 4],
        w: [usize; 4],
        y: [usize; 4],
        padding: usize,
        stride: usize,
        dilation: usize,
    }

    /// A tensor descriptor (NCHW), destroyed with it.
    struct TensorDesc(Desc);

    impl TensorDesc {
        fn new(api: &Api, data_type: c_int, [n, c, h, w]: [usize; 4]) -> Result<Self> {
            let mut desc = TensorDesc(std::ptr::null_mut());
            // SAFETY: created, then set with the argument types cudnn.h declares.
            unsafe {
                check(api, (api.create_tensor)(&mut desc.0), "tensor descriptor")?;
                let set = (api.set_tensor_4d)(desc.0, NCHW, data_type, int(n)?, int(c)?, int(h)?, int(w)?);
                check(api, set, "tensor descriptor")?;
            }
            Ok(desc)
        }
    }

    impl Drop for TensorDesc {
        fn drop(&mut self) {
            if let (Some(api), false) = (api(), self.0.is_null()) {
                // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
                unsafe { (api.destroy_tensor)(self.0) };
            }
        }
    }

    /// The filter (weights, [k, c, r, s]) and convolution descriptors of one shape.
    struct ConvDescs {
        filter: Desc,
        conv: Desc,
    }

    impl ConvDescs {
        fn new(api: &Api, s: &Shapes) -> Result<Self> {
            let null = std::ptr::null_mut();
            let mut descs = ConvDescs { filter: null, conv: null };
            let [k, c, r, q] = s.w;
            let (p, st, d) = (int(s.padding)?, int(s.stride)?, int(s.dilation)?);
            // SAFETY: each descriptor is created before it is set; on an error, Drop frees
            // what was created.
            unsafe {
                check(api, (api.create_filter)(&mut descs.filter), "filter descriptor")?;
                let set = (api.set_filter_4d)(descs.filter, s.data_type, NCHW, int(k)?, int(c)?, int(r)?, int(q)?);
                check(api, set, "filter descriptor")?;
                check(api, (api.create_conv)(&mut descs.conv), "convolution descriptor")?;
                let set = (api.set_conv_2d)(descs.conv, p, p, st, st, d, d, CROSS_CORRELATION, DATA_FLOAT);
                check(api, set, "convolution descriptor")?;
                check(api, (api.set_math_type)(descs.conv, TENSOR_OP_MATH), "math type")?;
            }
            Ok(descs)
        }
    }

    impl Drop for ConvDescs {
        fn drop(&mut self) {
            let Some(api) = api() else { return };
            // SAFETY: each is null or was created by the matching function, once.
            unsafe {
                if !self.filter.is_null() {
                    (api.destroy_filter)(self.filter);
                }
                if !self.conv.is_null() {
                    (api.destroy_conv)(self.conv);
                }
            }
        }
    }

    /// The batch cuDNN's heuristics rank algorithms at, whatever the actual batch: a guided
    /// step's two rows. One algorithm for every batch of a shape keeps a job's step from
    /// changing kernels when other jobs' steps join it (step-level batching's promise; whether
    /// cuDNN's kernels inside one algorithm then give the same bits is measured by
    /// `sdmesh-bench invariance`).
    const RANKING_BATCH: usize = 2;

    /// One convolution shape's descriptors and chosen algorithm.
    struct Plan {
        x: TensorDesc,
        y: TensorDesc,
        bias: TensorDesc,
        descs: ConvDescs,
        algo: c_int,
        workspace: usize,
    }

    // SAFETY: cuDNN descriptors are host structures with no thread affinity; a plan is only
    // used under its stream's lock.
    unsafe impl Send for Plan {}

    impl Plan {
        fn new(api: &Api, handle: Handle, s: &Shapes) -> Result<Self> {
            let dt = s.data_type;
            let (x, y) = (TensorDesc::new(api, dt, s.x)?, TensorDesc::new(api, dt, s.y)?);
            let bias = TensorDesc::new(api, dt, [1, s.w[0], 1, 1])?;
            let descs = ConvDescs::new(api, s)?;
            let with_batch = |mut dims: [usize; 4]| {
                dims[0] = RANKING_BATCH;
                dims
            };
            let ranking = (TensorDesc::new(api, dt, with_batch(s.x))?, TensorDesc::new(api, dt, with_batch(s.y))?);
            let mut perfs = [FwdAlgoPerf {
                algo: 0,
                status: -1,
                time: 0.0,
                memory: 0,
                determinism: 0,
                math_type: 0,
                reserved: [0; 3],
            }; ALGO_COUNT];
            let mut count: c_int = 0;
            // SAFETY: the descriptors are set; perfs has room for the ALGO_COUNT asked for.
            let ranked = unsafe {
                (api.get_algorithms)(
                    handle,
                    ranking.0 .0,
                    descs.filter,
                    descs.conv,
                    ranking.1 .0,
                    ALGO_COUNT as c_int,
                    &mut count,
                    perfs.as_mut_ptr(),
                )
            };
            check(api, ranked, "algorithm heuristics")?;
            let candidates: Vec<Candidate> = perfs[..(count.max(0) as usize).min(ALGO_COUNT)]
                .iter()
                .map(|p| Candidate { algo: p.algo, status: p.status, math_type: p.math_type })
                .collect();
            // The workspace at the actual batch; an algorithm cuDNN cannot size there is skipped.
            let workspace_of = |c: &Candidate| {
                let mut bytes = 0usize;
                // SAFETY: as above; only the math type changes on the convolution descriptor.
                let ok = unsafe {
                    (api.set_math_type)(descs.conv, c.math_type) == 0
                        && (api.workspace_size)(handle, x.0, descs.filter, descs.conv, y.0, c.algo, &mut bytes) == 0
                };
                ok.then_some(bytes)
            };
            let (chosen, workspace) = pick(&candidates, workspace_of, MAX_WORKSPACE).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "cuDNN convolution {:?} * {:?}: no algorithm within {MAX_WORKSPACE} bytes of workspace",
                    s.x, s.w
                ))
            })?;
            // SAFETY: as above.
            check(api, unsafe { (api.set_math_type)(descs.conv, chosen.math_type) }, "math type")?;
            Ok(Plan { x, y, bias, descs, algo: chosen.algo, workspace })
        }
    }

    /// A cuDNN handle bound to one CUDA stream, its workspace and its plans.
    struct StreamState {
        handle: Handle,
        workspace: Option<CudaSlice<u8>>,
        plans: HashMap<Shapes, Plan>,
        /// Shapes no plan could be made for (asked again, they fail at once).
        unsupported: std::collections::HashSet<Shapes>,
    }

    // SAFETY: the handle is only used under the state's lock (cuDNN handles may move between
    // threads but not be used by two at once).
    unsafe impl Send for StreamState {}

    type SharedState = Arc<Mutex<StreamState>>;

    /// The state for `stream`, made on first use (handles are per context and stream).
    fn stream_state(api: &Api, stream: &CudaStream) -> Result<SharedState> {
        static STATES: LazyLock<Mutex<HashMap<(usize, usize), SharedState>>> = LazyLock::new(Default::default);
        let key = (stream.context().cu_ctx() as usize, stream.cu_stream() as usize);
        let mut states = STATES.lock().map_err(|_| candle_core::Error::Msg("cuDNN states poisoned".into()))?;
        if let Some(state) = states.get(&key) {
            return Ok(state.clone());
        }
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: the stream's context is current on this thread (bound by the caller); the
        // handle is created before the stream is set on it.
        unsafe {
            check(api, (api.create)(&mut handle), "handle")?;
            check(api, (api.set_stream)(handle, stream.cu_stream() as *mut c_void), "stream")?;
        }
        let state = Arc::new(Mutex::new(StreamState {
            handle,
            workspace: None,
            plans: HashMap::new(),
            unsupported: Default::default(),
        }));
        states.insert(key, state.clone());
        Ok(state)
    }

    struct ConvOp {
        padding: usize,
        stride: usize,
        dilation: usize,
    }

    impl ConvOp {
        fn run(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
            bias: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            match x.0.dtype() {
                DType::F16 => self.run_typed::<half::f16>(DATA_HALF, x, w, bias),
                DType::BF16 => self.run_typed::<half::bf16>(DATA_BFLOAT16, x, w, bias),
                dt => candle_core::bail!("cuDNN convolution: {dt:?} runs on candle's convolution"),
            }
        }

        fn run_typed<T: DeviceRepr + CudaDType>(
            &self,
            data_type: c_int,
            (x, x_l): (&CudaStorage, &Layout),
            (w, w_l): (&CudaStorage, &Layout),
            (b, b_l): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let api = api().ok_or_else(|| candle_core::Error::Msg("cuDNN is not open".into()))?;
            if !x_l.is_contiguous() || !w_l.is_contiguous() || !b_l.is_contiguous() {
                candle_core::bail!("cuDNN convolution: contiguous input, weights and bias expected");
            }
            let (n, c, h, width) = x_l.shape().dims4()?;
            let (k, c_w, r, q) = w_l.shape().dims4()?;
            if c != c_w || b_l.shape().elem_count() != k {
                candle_core::bail!(
                    "cuDNN convolution: a {c}-channel input, weights {:?}, bias {:?}",
                    w_l.dims(),
                    b_l.dims()
                );
            }
            let out_side = |size: usize, kernel: usize| -> Result<usize> {
                let reach = self.dilation * (kernel - 1) + 1;
                let padded = size + 2 * self.padding;
                if padded < reach || self.stride == 0 {
                    candle_core::bail!("cuDNN convolution: a {size}-wide side is smaller than the kernel");
                }
                Ok((padded - reach) / self.stride + 1)
            };
            let shapes = Shapes {
                data_type,
                x: [n, c, h, width],
                w: [k, c, r, q],
                y: [n, k, out_side(h, r)?, out_side(width, q)?],
                padding: self.padding,
                stride: self.stride,
                dilation: self.dilation,
            };
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
            let state = stream_state(api, &stream)?;
            let mut state = state.lock().map_err(|_| candle_core::Error::Msg("cuDNN state poisoned".into()))?;
            if state.unsupported.contains(&shapes) {
                candle_core::bail!("cuDNN convolution {:?} * {:?}: failed before", shapes.x, shapes.w);
            }
            if !state.plans.contains_key(&shapes) {
                if state.plans.len() >= MAX_PLANS {
                    state.plans.clear();
                }
                match Plan::new(api, state.handle, &shapes) {
                    Ok(plan) => state.plans.insert(shapes, plan),
                    Err(e) => {
                        state.unsupported.insert(shapes);
                        return Err(e);
                    }
                };
            }
            let plan = &state.plans[&shapes];
            let (x_d, w_d, y_d, bias_d, conv_d, algo, needed) =
                (plan.x.0, plan.descs.filter, plan.y.0, plan.bias.0, plan.descs.conv, plan.algo, plan.workspace);
            if state.workspace.as_ref().map_or(0, |ws| ws.len()) < needed {
                // The old buffer's free is ordered on the stream after the calls that used it.
                state.workspace = None;
                // SAFETY: cuDNN writes its workspace before reading it.
                state.workspace = Some(unsafe { dev.alloc::<u8>(needed) }?);
            }
            let handle = state.handle;
            let x_s = x.as_cuda_slice::<T>()?.slice(x_l.start_offset()..);
            let w_s = w.as_cuda_slice::<T>()?.slice(w_l.start_offset()..);
            let b_s = b.as_cuda_slice::<T>()?.slice(b_l.start_offset()..);
            // SAFETY: cudnnConvolutionForward with beta 0 writes every output element.
            let mut out = unsafe { dev.alloc::<T>(shapes.y.iter().product()) }?;
            {
                let (x_p, _x_sync) = x_s.device_ptr(&stream);
                let (w_p, _w_sync) = w_s.device_ptr(&stream);
                let (y_p, _y_sync) = out.device_ptr_mut(&stream);
                let (ws_p, ws_bytes, _ws_sync) = match state.workspace.as_mut() {
                    Some(ws) if needed > 0 => {
                        let bytes = ws.len();
                        let (p, sync) = ws.device_ptr_mut(&stream);
                        (p as usize as *mut c_void, bytes, Some(sync))
                    }
                    _ => (std::ptr::null_mut(), 0, None),
                };
                let (one, zero) = (1f32, 0f32);
                let (one, zero) = (&one as *const f32 as *const c_void, &zero as *const f32 as *const c_void);
                let y_p = y_p as usize as *mut c_void;
                // SAFETY: the descriptors describe these buffers (shapes, dtype, NCHW), the
                // workspace holds at least what the algorithm asked for, and every pointer is
                // on the handle's stream; f16/bf16 data with f32 compute takes f32 scalars.
                let status = unsafe {
                    (api.forward)(
                        handle,
                        one,
                        x_d,
                        x_p as usize as *const c_void,
                        w_d,
                        w_p as usize as *const c_void,
                        conv_d,
                        algo,
                        ws_p,
                        ws_bytes,
                        zero,
                        y_d,
                        y_p,
                    )
                };
                check(api, status, "convolution")?;
                let (b_p, _b_sync) = b_s.device_ptr(&stream);
                // SAFETY: y += bias broadcast over [1, k, 1, 1], both described above.
                let status =
                    unsafe { (api.add_tensor)(handle, one, bias_d, b_p as usize as *const c_void, one, y_d, y_p) };
                check(api, status, "bias")?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shapes.y.to_vec())))
        }
    }

    impl candle_core::CustomOp3 for ConvOp {
        fn name(&self) -> &'static str {
            "cudnn-conv2d"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the cuDNN convolution runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
            b: &CudaStorage,
            b_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.run((x, x_l), (w, w_l), (b, b_l))
        }
    }

    /// `conv` (with a bias) on `x`.
    pub(super) fn conv2d(conv: &nn::Conv2d, bias: &Tensor, x: &Tensor) -> Result<Tensor> {
        let config = conv.config();
        let op = ConvOp { padding: config.padding, stride: config.stride, dilation: config.dilation };
        x.contiguous()?.apply_op3_no_bwd(&conv.weight().contiguous()?, &bias.contiguous()?, &op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(algo: i32, status: i32) -> Candidate {
        Candidate { algo, status, math_type: 1 }
    }

    /// cuDNN's ranking is kept: the first candidate it can run within the workspace cap wins;
    /// failed statuses, workspaces over the cap and workspaces cuDNN cannot size are skipped.
    #[test]
    fn picks_the_best_ranked_runnable_algorithm_within_the_workspace() {
        let ranked = [candidate(6, 0), candidate(1, 3000), candidate(4, 0), candidate(0, 0), candidate(2, 0)];
        let workspace = |c: &Candidate| match c.algo {
            6 => Some(5 << 30),
            4 => None,
            0 => Some(0),
            _ => Some(1 << 20),
        };
        assert_eq!(pick(&ranked, workspace, 1 << 30), Some((candidate(0, 0), 0)));
        assert_eq!(pick(&ranked, workspace, 8 << 30), Some((candidate(6, 0), 5 << 30)));
        assert_eq!(pick(&ranked[..3], workspace, 1 << 30), None);
        assert_eq!(pick(&[], workspace, 1 << 30), None);
    }

    /// CUDA builds: where cuDNN is on the library path (`SDMESH_EXPECT_CUDNN=1` says it is),
    /// it opens and every entry point resolves, with no GPU needed; otherwise the build still
    /// works and says the library is missing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cudnn_opens_where_installed() {
        let opened = cuda::api().is_some();
        assert_eq!(version().is_some(), opened);
        if std::env::var_os("SDMESH_EXPECT_CUDNN").is_some() {
            assert!(opened, "cuDNN did not open (see the warning above)");
            assert!(version().is_some_and(|v| v >= 8000));
        }
    }

    /// Off CUDA (and in builds without the `cuda` feature) every convolution is candle's.
    #[test]
    fn cpu_tensors_never_take_the_cudnn_path() {
        let device = candle_core::Device::Cpu;
        assert!(!active(&device, DType::F16));
        assert!(!active(&device, DType::F32));
        let weight = Tensor::arange(0f32, 54., &device).unwrap().reshape((2, 3, 3, 3)).unwrap();
        let conv = nn::Conv2d::new(weight, None, nn::Conv2dConfig { padding: 1, ..Default::default() });
        let x = Tensor::ones((1, 3, 4, 4), DType::F32, &device).unwrap();
        let expected = conv.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(conv2d(&conv, &x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    }
}
