// Launch-shape sweep (a record, not part of the package; see sweep.py): bf16 LayerNorm at
// N = 4096 and GELU, each with its block size, vectors per thread and grid as parameters.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include "tempo/gelu.h"
#include "tempo/norm.h"
using namespace tempo;
using bf16 = c10::BFloat16;

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };
template <int VEC, typename T, typename A> __device__ __forceinline__ void load_vec(const T* p, A (&o)[VEC]) {
  const Vec<T, VEC> q = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) o[k] = static_cast<A>(q.v[k]);
}
template <int VEC, typename T, typename A> __device__ __forceinline__ void store_vec(T* p, const A (&i)[VEC]) {
  Vec<T, VEC> q;
#pragma unroll
  for (int k = 0; k < VEC; ++k) q.v[k] = static_cast<T>(i[k]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = q;
}
template <int NV> __device__ __forceinline__ void block_sum(float (&v)[NV], float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < NV; ++k) smem[warp * NV + k] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      v[k] = lane < warps ? smem[lane * NV + k] : 0.f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    }
    if (lane == 0)
#pragma unroll
      for (int k = 0; k < NV; ++k) smem[k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = smem[k];
  __syncthreads();
}

constexpr int VEC = 8;
template <int ITEMS, int T, int MINB>
__global__ void __launch_bounds__(T, MINB) ln_fwd(const bf16* __restrict__ x, const bf16* __restrict__ gamma,
    const bf16* __restrict__ beta, bf16* __restrict__ y, float* __restrict__ rstd, int64_t M, int64_t N, float eps) {
  __shared__ float smem[32];
  const int64_t vecs = N / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    float v[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = threadIdx.x + int64_t(i) * T;
      if (c < vecs) load_vec<VEC>(x + row * N + c * VEC, v[i]);
      else for (int k = 0; k < VEC; ++k) v[i][k] = 0;
    }
    float s[1] = {0};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int k = 0; k < VEC; ++k) s[0] += v[i][k];
    block_sum(s, smem);
    const float centre = s[0] / N;
    float q[1] = {0};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (threadIdx.x + int64_t(i) * T >= vecs) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) q[0] += (v[i][k] - centre) * (v[i][k] - centre);
    }
    block_sum(q, smem);
    const float r = norm_rstd(q[0] / N, eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = threadIdx.x + int64_t(i) * T;
      if (c >= vecs) continue;
      float w[VEC], b[VEC];
      load_vec<VEC>(gamma + c * VEC, w);
      load_vec<VEC>(beta + c * VEC, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = norm_output(v[i][k], centre, r, w[k], b[k]);
      store_vec<VEC>(y + row * N + c * VEC, v[i]);
    }
  }
}

template <int ITEMS, int T, int MINB>
__global__ void __launch_bounds__(T, MINB) ln_bwd(const bf16* __restrict__ dy, const bf16* __restrict__ y,
    const float* __restrict__ rstd, const bf16* __restrict__ gamma, const bf16* __restrict__ beta, bf16* __restrict__ dx,
    float* __restrict__ gpart, float* __restrict__ bpart, int64_t M, int64_t N, int64_t chunk_rows) {
  __shared__ float smem[64];
  const int64_t vecs = N / VEC, chunk = blockIdx.x;
  const int64_t row_end = M < (chunk + 1) * chunk_rows ? M : (chunk + 1) * chunk_rows;
  float dg[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dg[i][k] = db[i][k] = 0;
  for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
    float g[ITEMS][VEC], xh[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = threadIdx.x + int64_t(i) * T;
      if (c < vecs) { load_vec<VEC>(dy + row * N + c * VEC, g[i]); load_vec<VEC>(y + row * N + c * VEC, xh[i]); }
      else for (int k = 0; k < VEC; ++k) g[i][k] = xh[i][k] = 0;
    }
    const float r = rstd[row];
    float s[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = threadIdx.x + int64_t(i) * T;
      if (c >= vecs) continue;
      float w[VEC], b[VEC];
      load_vec<VEC>(gamma + c * VEC, w);
      load_vec<VEC>(beta + c * VEC, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = g[i][k];
        const float h = norm_recover_xhat(xh[i][k], w[k], b[k]);
        dg[i][k] += d * h; db[i][k] += d;
        g[i][k] = w[k] * d; xh[i][k] = h;
        s[0] += g[i][k]; s[1] += g[i][k] * h;
      }
    }
    block_sum(s, smem);
    const float mg = s[0] / N, mgx = s[1] / N;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = threadIdx.x + int64_t(i) * T;
      if (c >= vecs) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[i][k] = norm_input_grad(g[i][k], xh[i][k], r, mg, mgx);
      store_vec<VEC>(dx + row * N + c * VEC, g[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c = threadIdx.x + int64_t(i) * T;
    if (c >= vecs) continue;
    store_vec<VEC>(gpart + chunk * N + c * VEC, dg[i]);
    store_vec<VEC>(bpart + chunk * N + c * VEC, db[i]);
  }
}

__global__ void col_sum(const float* __restrict__ part, bf16* __restrict__ out, int64_t chunks, int64_t N) {
  __shared__ float tile[16][33];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0;
  if (col < N) for (int64_t c = threadIdx.y; c < chunks; c += 16) s += part[c * N + col];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) { float t = 0; for (int l = 0; l < 16; ++l) t += tile[l][threadIdx.x]; out[col] = t; }
}

// GELU: U packs of 8 per thread per step.
template <int U> __device__ __forceinline__ int64_t step0() { return int64_t(blockIdx.x) * blockDim.x * U; }
template <typename Form, int U>
__global__ void gelu_fwd(const bf16* __restrict__ x, bf16* __restrict__ y, uint8_t* __restrict__ bits, int64_t n) {
  const int64_t nb = n / 8;
  for (int64_t s = step0<U>(); s < nb; s += int64_t(gridDim.x) * blockDim.x * U) {
    Vec<bf16, 8> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { const int64_t b = s + threadIdx.x + int64_t(u) * blockDim.x; if (b < nb) in[u] = reinterpret_cast<const Vec<bf16, 8>*>(x)[b]; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t b = s + threadIdx.x + int64_t(u) * blockDim.x;
      if (b >= nb) continue;
      Vec<bf16, 8> o; uint8_t p = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) { const float v = static_cast<float>(in[u].v[k]); o.v[k] = static_cast<bf16>(Form::value(v)); p |= uint8_t(v < float(Form::x_star)) << k; }
      reinterpret_cast<Vec<bf16, 8>*>(y)[b] = o; bits[b] = p;
    }
  }
}
template <int U>
__global__ void gelu_bwd(const float* __restrict__ table, const bf16* __restrict__ dy, const bf16* __restrict__ y, const uint8_t* __restrict__ bits, bf16* __restrict__ dx, int64_t n) {
  const int64_t nb = n / 8;
  TableDerivative der{table};
  for (int64_t s = step0<U>(); s < nb; s += int64_t(gridDim.x) * blockDim.x * U) {
    Vec<bf16, 8> g[U], yy[U]; uint8_t p[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { const int64_t b = s + threadIdx.x + int64_t(u) * blockDim.x; if (b < nb) { g[u] = reinterpret_cast<const Vec<bf16, 8>*>(dy)[b]; yy[u] = reinterpret_cast<const Vec<bf16, 8>*>(y)[b]; p[u] = bits[b]; } }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t b = s + threadIdx.x + int64_t(u) * blockDim.x;
      if (b >= nb) continue;
      Vec<bf16, 8> o;
#pragma unroll
      for (int k = 0; k < 8; ++k) o.v[k] = static_cast<bf16>(static_cast<float>(g[u].v[k]) * der(yy[u].v[k], (p[u] >> k) & 1));
      reinterpret_cast<Vec<bf16, 8>*>(dx)[b] = o;
    }
  }
}

#define S at::cuda::getCurrentCUDAStream()
void ln_fwd_run(int variant, at::Tensor x, at::Tensor w, at::Tensor b, at::Tensor y, at::Tensor rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  auto a = [&](auto k, int T) { k<<<M, T, 0, S>>>((bf16*)x.data_ptr(), (bf16*)w.data_ptr(), (bf16*)b.data_ptr(), (bf16*)y.data_ptr(), rstd.data_ptr<float>(), M, N, 1e-5f); };
  const int64_t vecs = N / VEC;
  switch (variant) {
    case 0: a(ln_fwd<4, 128, 1>, 128); break;
    case 1: a(ln_fwd<2, 256, 1>, 256); break;
    case 2: a(ln_fwd<1, 512, 1>, 512); break;
    case 3: a(ln_fwd<4, 128, 8>, 128); break;
    case 4: a(ln_fwd<2, 256, 4>, 256); break;
    case 5: a(ln_fwd<1, 512, 2>, 512); break;
    case 6: a(ln_fwd<2, 256, 2>, 256); break;
    default: TORCH_CHECK(false);
  }
  (void)vecs;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
void ln_bwd_run(int variant, int64_t chunks, at::Tensor dy, at::Tensor y, at::Tensor rstd, at::Tensor w, at::Tensor b,
                at::Tensor dx, at::Tensor gpart, at::Tensor bpart, at::Tensor dw, at::Tensor db) {
  const int64_t M = y.size(0), N = y.size(1);
  const int64_t rows = (M + chunks - 1) / chunks;
  chunks = (M + rows - 1) / rows;
  auto a = [&](auto k, int T) { k<<<chunks, T, 0, S>>>((bf16*)dy.data_ptr(), (bf16*)y.data_ptr(), rstd.data_ptr<float>(), (bf16*)w.data_ptr(), (bf16*)b.data_ptr(), (bf16*)dx.data_ptr(), gpart.data_ptr<float>(), bpart.data_ptr<float>(), M, N, rows); };
  switch (variant) {
    case 0: a(ln_bwd<2, 256, 1>, 256); break;
    case 1: a(ln_bwd<1, 512, 1>, 512); break;
    case 2: a(ln_bwd<4, 128, 1>, 128); break;
    case 3: a(ln_bwd<2, 256, 3>, 256); break;
    case 4: a(ln_bwd<1, 512, 2>, 512); break;
    case 5: a(ln_bwd<4, 128, 4>, 128); break;
    default: TORCH_CHECK(false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  col_sum<<<(N + 31) / 32, dim3(32, 16), 0, S>>>(gpart.data_ptr<float>(), (bf16*)dw.data_ptr(), chunks, N);
  col_sum<<<(N + 31) / 32, dim3(32, 16), 0, S>>>(bpart.data_ptr<float>(), (bf16*)db.data_ptr(), chunks, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
// grid: 0 = capped at 16 blocks per SM, 1 = every pack its own thread-slot (no loop)
void gelu_fwd_run(int unroll, int full_grid, bool tanh_form, int threads, at::Tensor x, at::Tensor y, at::Tensor bits) {
  const int64_t n = x.numel(), nb = n / 8;
  const int64_t need = (nb + int64_t(threads) * unroll - 1) / (int64_t(threads) * unroll);
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const unsigned grid = full_grid ? need : std::min(need, cap);
  auto go = [&](auto k) { k<<<grid, threads, 0, S>>>((bf16*)x.data_ptr(), (bf16*)y.data_ptr(), bits.data_ptr<uint8_t>(), n); };
  if (tanh_form) { if (unroll == 1) go(gelu_fwd<GeluTanh, 1>); else if (unroll == 2) go(gelu_fwd<GeluTanh, 2>); else go(gelu_fwd<GeluTanh, 4>); }
  else { if (unroll == 1) go(gelu_fwd<GeluErf, 1>); else if (unroll == 2) go(gelu_fwd<GeluErf, 2>); else go(gelu_fwd<GeluErf, 4>); }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
void gelu_bwd_run(int unroll, int full_grid, int threads, at::Tensor table, at::Tensor dy, at::Tensor y, at::Tensor bits, at::Tensor dx) {
  const int64_t n = y.numel(), nb = n / 8;
  const int64_t need = (nb + int64_t(threads) * unroll - 1) / (int64_t(threads) * unroll);
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const unsigned grid = full_grid ? need : std::min(need, cap);
  auto go = [&](auto k) { k<<<grid, threads, 0, S>>>(table.data_ptr<float>(), (bf16*)dy.data_ptr(), (bf16*)y.data_ptr(), bits.data_ptr<uint8_t>(), (bf16*)dx.data_ptr(), n); };
  if (unroll == 1) go(gelu_bwd<1>); else if (unroll == 2) go(gelu_bwd<2>); else go(gelu_bwd<4>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ln_fwd", &ln_fwd_run); m.def("ln_bwd", &ln_bwd_run);
  m.def("gelu_fwd", &gelu_fwd_run); m.def("gelu_bwd", &gelu_bwd_run);
}
