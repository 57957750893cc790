// cuDNN fused attention (SDPA) for vjepa-model's `cudnn` feature.
//
// Why: torch's fastest attention on Hopper is cuDNN's fused SDPA; this shim gives our candle
// custom op the same kernels. It builds cuDNN-frontend graphs that read Q, K and V straight
// out of the fused projection `qkv [B, N, 3·H·hd]` through strides (no split or transpose),
// write O as `[B, N, H·hd]`, and, for the backward pass, write dQ, dK and dV into one
// `dqkv [B, N, 3·H·hd]` the same way. Graphs are cached per shape (the context length changes
// from batch to batch). libcudnn is opened at run time (cuDNN frontend's dynamic loading), so
// a binary built with the feature still starts on a machine without cuDNN; `vjepa_cudnn_load`
// says why it cannot be used there.
//
// The C ABI below is everything the Rust side (`src/kernels/cudnn.rs`) calls. Every function
// returns 0 on success and otherwise leaves a message for `vjepa_cudnn_error` (per thread).

#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>

namespace fe = cudnn_frontend;

// The frontend's dynamic loading resolves every cuDNN call through this handle; we own it.
namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace {

thread_local std::string last_error;

int fail(std::string msg) {
    last_error = std::move(msg);
    return 1;
}

enum : int64_t { Q_UID = 1, K_UID, V_UID, O_UID, STATS_UID, DO_UID, DQ_UID, DK_UID, DV_UID };

enum Kind : int { FORWARD = 0, BACKWARD = 1 };
enum Dtype : int { BF16 = 0, F16 = 1 };

// One cached graph: what it was built for, and the workspace it needs.
struct Entry {
    std::shared_ptr<fe::graph::Graph> graph;
    int device = 0;  // the CUDA device it was built on (its handle's)
    int64_t workspace = 0;
    int64_t third_bytes = 0;  // bytes of one of q, k, v in a row of qkv: H·hd 2-byte elements
    bool stats = false;
};

// Where a handle, graph or kernel cache may be used: candle launches on the per-thread default
// stream, so one `stream` value names a different stream on every thread (the target lane's
// among them) and on every device; cuDNN promises nothing for a handle used on two streams at
// once, and a plan belongs to the handle (so the device) it was built with.
using Place = std::tuple<void *, std::thread::id, int>;
using Key = std::tuple<Place, int, int, int64_t, int64_t, int64_t, int64_t, uint32_t, bool, bool, bool>;
// A graph's structure without its batch and sequence length: what one kernel cache serves when
// shapes are dynamic. The last flag: a backward graph that cuDNN up to 9.15.0 builds with a
// workaround padding mask (sequence length not a multiple of 128), a different structure.
using Structure = std::tuple<Place, int, int, int64_t, int64_t, uint32_t, bool, bool, bool>;

std::mutex mu;
// Never destroyed: their destructors would run at exit, possibly after the CUDA driver has
// shut down (torch leaks its cuDNN handles for the same reason).
auto &handles = *new std::map<Place, cudnnHandle_t>();
auto &graphs = *new std::map<Key, std::unique_ptr<Entry>>();
auto &refused = *new std::map<Key, std::string>();  // shapes cuDNN would not build, with why
double build_seconds = 0.0;  // spent building the graphs in `graphs`
// Dynamic shapes: one kernel cache per structure, so a new sequence length reuses the kernels
// built for the first instead of compiling its own; structures cuDNN refused that way (while
// the same shape built static) build with static shapes from then on (counted, with the last
// reason).
auto &kernel_caches = *new std::map<Structure, std::shared_ptr<fe::KernelCache>>();
auto &dynamic_refused = *new std::map<Structure, std::string>();
int64_t dynamic_refusals = 0;
auto &last_dynamic_refusal = *new std::string();

Place place_here(void *stream, int device) {
    return Place{stream, std::this_thread::get_id(), device};
}

int handle_for(const Place &key, cudnnHandle_t *out) {
    void *stream = std::get<0>(key);
    auto it = handles.find(key);
    if (it != handles.end()) {
        *out = it->second;
        return 0;
    }
    cudnnHandle_t h = nullptr;
    auto st = fe::detail::create_handle(&h);
    if (st != CUDNN_STATUS_SUCCESS) {
        return fail(std::string("cudnnCreate failed: ") + fe::detail::get_error_string(st));
    }
    st = fe::detail::set_stream(h, static_cast<cudaStream_t>(stream));
    if (st != CUDNN_STATUS_SUCCESS) {
        fe::detail::destroy_handle(h);
        return fail(std::string("cudnnSetStream failed: ") + fe::detail::get_error_string(st));
    }
    handles.emplace(key, h);
    *out = h;
    return 0;
}

// `qkv [B, N, 3·H·hd]` seen as [b, h, s, d] at column offset `which·H·hd`.
fe::graph::Tensor_attributes qkv_part(const char *name, int64_t uid, int64_t b, int64_t h, int64_t n,
                                      int64_t hd) {
    int64_t d = h * hd;
    return fe::graph::Tensor_attributes()
        .set_name(name)
        .set_uid(uid)
        .set_dim({b, h, n, hd})
        .set_stride({n * 3 * d, hd, 3 * d, 1});
}

// `[B, N, H·hd]` (O and dO) seen as [b, h, s, d].
std::vector<int64_t> o_stride(int64_t h, int64_t n, int64_t hd) {
    int64_t d = h * hd;
    return {n * d, hd, d, 1};
}

std::vector<int64_t> stats_stride(int64_t h, int64_t n) {
    return {h * n, n, 1, 1};
}

// A graph with the data types set and, for dynamic shapes, `cache` (else null) attached. Both
// must come before any node: `sdpa()` picks its implementation (unified or composite) and
// each node copies the graph's settings when it is added, so switching dynamic shapes on
// later would leave a node built for static shapes inside a dynamic graph.
std::shared_ptr<fe::graph::Graph> new_graph(int dtype, const std::shared_ptr<fe::KernelCache> &cache) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(dtype == F16 ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    if (cache) {
        g->set_dynamic_shape_enabled(true).set_kernel_cache(cache);
    }
    return g;
}

std::shared_ptr<fe::graph::Graph> forward_graph(int dtype, int64_t b, int64_t h, int64_t n, int64_t hd,
                                                float scale, bool stats,
                                                const std::shared_ptr<fe::KernelCache> &cache) {
    auto g = new_graph(dtype, cache);
    auto q = g->tensor(qkv_part("Q", Q_UID, b, h, n, hd));
    auto k = g->tensor(qkv_part("K", K_UID, b, h, n, hd));
    auto v = g->tensor(qkv_part("V", V_UID, b, h, n, hd));
    auto opts = fe::graph::SDPA_attributes().set_name("vjepa_sdpa").set_generate_stats(stats).set_attn_scale(scale);
    auto [o, st] = g->sdpa(q, k, v, opts);
    o->set_output(true).set_uid(O_UID).set_dim({b, h, n, hd}).set_stride(o_stride(h, n, hd));
    if (stats) {
        st->set_output(true)
            .set_uid(STATS_UID)
            .set_data_type(fe::DataType_t::FLOAT)
            .set_dim({b, h, n, 1})
            .set_stride(stats_stride(h, n));
    }
    return g;
}

std::shared_ptr<fe::graph::Graph> backward_graph(int dtype, int64_t b, int64_t h, int64_t n, int64_t hd,
                                                 float scale, bool deterministic,
                                                 const std::shared_ptr<fe::KernelCache> &cache) {
    auto g = new_graph(dtype, cache);
    auto q = g->tensor(qkv_part("Q", Q_UID, b, h, n, hd));
    auto k = g->tensor(qkv_part("K", K_UID, b, h, n, hd));
    auto v = g->tensor(qkv_part("V", V_UID, b, h, n, hd));
    auto o = g->tensor(
        fe::graph::Tensor_attributes().set_name("O").set_uid(O_UID).set_dim({b, h, n, hd}).set_stride(o_stride(h, n, hd)));
    auto d_o = g->tensor(
        fe::graph::Tensor_attributes().set_name("dO").set_uid(DO_UID).set_dim({b, h, n, hd}).set_stride(o_stride(h, n, hd)));
    auto st = g->tensor(fe::graph::Tensor_attributes()
                            .set_name("Stats")
                            .set_uid(STATS_UID)
                            .set_dim({b, h, n, 1})
                            .set_stride(stats_stride(h, n))
                            .set_data_type(fe::DataType_t::FLOAT));
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("vjepa_sdpa_backward")
                    .set_attn_scale(scale)
                    .set_deterministic_algorithm(deterministic);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, d_o, st, opts);
    int64_t d = h * hd;
    std::vector<int64_t> s = {n * 3 * d, hd, 3 * d, 1};
    dq->set_output(true).set_uid(DQ_UID).set_dim({b, h, n, hd}).set_stride(s);
    dk->set_output(true).set_uid(DK_UID).set_dim({b, h, n, hd}).set_stride(s);
    dv->set_output(true).set_uid(DV_UID).set_dim({b, h, n, hd}).set_stride(s);
    return g;
}

template <class F>
int guarded(F &&f) {
    try {
        return f();
    } catch (const std::exception &e) {
        return fail(std::string("cuDNN frontend: ") + e.what());
    } catch (...) {
        return fail("cuDNN frontend: unknown exception");
    }
}

using Pack = std::unordered_map<int64_t, void *>;

// The three column blocks (q, k, v or dq, dk, dv) of a [B, N, 3·H·hd] buffer under their uids.
void add_thirds(Pack &pack, const void *base, int64_t third_bytes, int64_t a, int64_t b, int64_t c) {
    auto *p = static_cast<char *>(const_cast<void *>(base));
    pack[a] = p;
    pack[b] = p + third_bytes;
    pack[c] = p + 2 * third_bytes;
}

// Runs a prepared graph with `pack` on `stream` (this stream's handle), under the cache's lock.
int execute(Entry *e, void *stream, Pack &pack, void *workspace, const char *what) {
    return guarded([&]() -> int {
        std::lock_guard<std::mutex> lock(mu);
        cudnnHandle_t handle = nullptr;
        if (handle_for(place_here(stream, e->device), &handle) != 0) {
            return 1;
        }
        auto err = e->graph->execute(handle, pack, workspace);
        if (err.is_bad()) {
            return fail(std::string(what) + ": " + err.get_message());
        }
        return 0;
    });
}

}  // namespace

extern "C" {

// Opens libcudnn (`path`, or "libcudnn.so.9" from the loader's search path when null) once per
// process and checks that it answers. Returns 0 when cuDNN can be used.
int vjepa_cudnn_load(const char *path) {
    std::lock_guard<std::mutex> lock(mu);
    if (fe::cudnn_dlhandle != nullptr) {
        return 0;
    }
    const char *lib = (path != nullptr && path[0] != '\0') ? path : "libcudnn.so.9";
    void *h = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) {
        const char *why = dlerror();
        return fail(std::string("cannot open ") + lib + ": " + (why ? why : "unknown error"));
    }
    if (dlsym(h, "cudnnGetVersion") == nullptr) {
        dlclose(h);
        return fail(std::string(lib) + " has no cudnnGetVersion: not a cuDNN library");
    }
#if defined(CUDA_VERSION) && CUDA_VERSION >= 13000
    // The frontend opens its own CUDA runtime and prefers libcudart.so.12 when both majors are
    // on the loader path, while this binary runs on 13: refuse that with the way out.
    const char *named = std::getenv("CUDNN_FRONTEND_CUDART_LIB_NAME");
    if (named == nullptr || named[0] == '\0') {  // the frontend ignores an empty name too
        void *rt12 = dlopen("libcudart.so.12", RTLD_LAZY | RTLD_LOCAL);
        if (rt12 != nullptr) {
            dlclose(rt12);
            void *rt13 = dlopen("libcudart.so.13", RTLD_LAZY | RTLD_LOCAL);
            const bool both = rt13 != nullptr;
            if (rt13 != nullptr) {
                dlclose(rt13);
            }
            dlclose(h);
            return fail(both ? "libcudart.so.12 and this binary's CUDA 13 runtime are both on the loader path and "
                               "the cuDNN frontend would pick 12: set CUDNN_FRONTEND_CUDART_LIB_NAME=libcudart.so.13"
                             : "the cuDNN frontend would open libcudart.so.12 (the only CUDA runtime on the loader "
                               "path) for this CUDA 13 binary: put libcudart.so.13 on the loader path, or name one "
                               "in CUDNN_FRONTEND_CUDART_LIB_NAME");
        }
    }
#endif
    // The frontend needs a CUDA runtime for every build and run (device queries, workspace
    // memsets): open it now, so that its absence refuses cuDNN here, with the reason, rather
    // than every graph later.
    try {
        if (fe::detail::get_cuda_runtime_version() == 0) {
            dlclose(h);
            return fail("the CUDA runtime the cuDNN frontend opened does not report a version");
        }
    } catch (const std::exception &e) {
        dlclose(h);
        return fail(std::string("cuDNN frontend: ") + e.what() +
                    " (put libcudart.so.13 on the loader path, or name one in CUDNN_FRONTEND_CUDART_LIB_NAME)");
    }
    fe::cudnn_dlhandle = h;
    return 0;
}

// cuDNN's version as a number (9.10.2 → 91002); 0 before a successful load.
size_t vjepa_cudnn_version(void) {
    if (fe::cudnn_dlhandle == nullptr) {
        return 0;
    }
    try {
        return fe::detail::get_backend_version();
    } catch (...) {
        return 0;
    }
}

// Graphs built so far (one per shape, direction and options) and the seconds spent building
// them: a new context length costs a build, so this says what the shape cache costs a run.
void vjepa_cudnn_graph_stats(int64_t *graphs_built, double *seconds) {
    std::lock_guard<std::mutex> lock(mu);
    *graphs_built = static_cast<int64_t>(graphs.size());
    *seconds = build_seconds;
}

// How many graph structures cuDNN refused to build with dynamic shapes (they fell back to static
// shapes), and the last reason (empty when none; copied for this thread: valid until its next
// call on this thread).
const char *vjepa_cudnn_dynamic_refusals(int64_t *count) {
    thread_local std::string why;
    std::lock_guard<std::mutex> lock(mu);
    *count = dynamic_refusals;
    why = last_dynamic_refusal;
    return why.c_str();
}

// The last error on this thread (valid until the next call on this thread).
const char *vjepa_cudnn_error(void) {
    return last_error.c_str();
}

// Finds or builds the graph for one attention call and reports its workspace in bytes.
// kind: 0 forward, 1 backward; dtype: 0 bf16, 1 f16. `stats` (forward) also writes the
// per-row log-sum-exp the backward pass needs; `deterministic` (backward) asks for the
// engine without atomics; `dynamic` builds with dynamic shapes and the structure's kernel cache
// (falling back to static shapes where cuDNN refuses).
int vjepa_cudnn_sdpa_prepare(void *stream, int device, int kind, int dtype, int64_t b, int64_t h, int64_t n,
                             int64_t hd, float scale, int stats, int deterministic, int dynamic, void **entry,
                             int64_t *workspace) {
    return guarded([&]() -> int {
        std::lock_guard<std::mutex> lock(mu);
        if (fe::cudnn_dlhandle == nullptr) {
            return fail("libcudnn is not loaded");
        }
        uint32_t scale_bits = 0;
        std::memcpy(&scale_bits, &scale, sizeof scale_bits);
        const Place place = place_here(stream, device);
        Key key{place, kind, dtype, b, h, n, hd, scale_bits, stats != 0, deterministic != 0, dynamic != 0};
        const bool padded = kind == BACKWARD && n % 128 != 0 && fe::detail::get_backend_version() <= 91500;
        Structure structure{place, kind, dtype, h, hd, scale_bits, stats != 0, deterministic != 0, padded};
        auto it = graphs.find(key);
        if (it == graphs.end()) {
            auto no = refused.find(key);
            if (no != refused.end()) {
                return fail(no->second);
            }
            cudnnHandle_t handle = nullptr;
            if (handle_for(place, &handle) != 0) {
                return 1;
            }
            auto started = std::chrono::steady_clock::now();
            auto e = std::make_unique<Entry>();
            e->device = device;
            auto make = [&](const std::shared_ptr<fe::KernelCache> &cache) {
                return kind == FORWARD ? forward_graph(dtype, b, h, n, hd, scale, stats != 0, cache)
                                       : backward_graph(dtype, b, h, n, hd, scale, deterministic != 0, cache);
            };
            fe::error_t err;
            if (dynamic != 0 && dynamic_refused.find(structure) == dynamic_refused.end()) {
                auto &cache = kernel_caches[structure];
                if (!cache) {
                    cache = std::make_shared<fe::KernelCache>();
                }
                e->graph = make(cache);
                err = e->graph->build(handle, {fe::HeurMode_t::A});
                if (err.is_bad()) {
                    const std::string why =
                        "n=" + std::to_string(n) + " hd=" + std::to_string(hd) + ": " + err.get_message();
                    e->graph = make(nullptr);
                    err = e->graph->build(handle, {fe::HeurMode_t::A});
                    if (!err.is_bad()) {
                        // Static shapes build where dynamic ones did not: this structure builds
                        // static from now on. (A shape neither way builds is that shape's
                        // refusal below, and leaves dynamic shapes on for the others.)
                        last_dynamic_refusal = why;
                        dynamic_refused.emplace(structure, why);
                        kernel_caches.erase(structure);
                        ++dynamic_refusals;
                    }
                }
            } else {
                e->graph = make(nullptr);
                err = e->graph->build(handle, {fe::HeurMode_t::A});
            }
            if (err.is_bad()) {
                std::string why = "cannot build the SDPA " + std::string(kind == FORWARD ? "forward" : "backward") +
                                  " graph for b=" + std::to_string(b) + " h=" + std::to_string(h) +
                                  " n=" + std::to_string(n) + " hd=" + std::to_string(hd) + ": " + err.get_message();
                refused.emplace(key, why);
                return fail(why);
            }
            err = e->graph->get_workspace_size(e->workspace);
            if (err.is_bad()) {
                return fail("SDPA workspace size: " + err.get_message());
            }
            e->third_bytes = h * hd * 2;
            e->stats = stats != 0;
            it = graphs.emplace(key, std::move(e)).first;
            build_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        }
        *entry = it->second.get();
        *workspace = it->second->workspace;
        return 0;
    });
}

// Runs a prepared forward graph on `stream`: qkv [B, N, 3·H·hd] → out [B, N, H·hd] and, when
// prepared with stats, stats [B, H, N] (f32).
int vjepa_cudnn_sdpa_fwd(void *entry, void *stream, const void *qkv, void *out, void *stats, void *workspace) {
    auto *e = static_cast<Entry *>(entry);
    Pack pack{{O_UID, out}};
    add_thirds(pack, qkv, e->third_bytes, Q_UID, K_UID, V_UID);
    if (e->stats) {
        if (stats == nullptr) {
            return fail("SDPA forward prepared with stats but given no stats buffer");
        }
        pack[STATS_UID] = stats;
    }
    return execute(e, stream, pack, workspace, "SDPA forward");
}

// Runs a prepared backward graph: from qkv, the forward's out and stats, and dout, writes
// dqkv [B, N, 3·H·hd] (dQ, dK and dV in the q, k and v columns).
int vjepa_cudnn_sdpa_bwd(void *entry, void *stream, const void *qkv, const void *out, const void *dout,
                         const void *stats, void *dqkv, void *workspace) {
    auto *e = static_cast<Entry *>(entry);
    Pack pack{
        {O_UID, const_cast<void *>(out)},
        {DO_UID, const_cast<void *>(dout)},
        {STATS_UID, const_cast<void *>(stats)},
    };
    add_thirds(pack, qkv, e->third_bytes, Q_UID, K_UID, V_UID);
    add_thirds(pack, dqkv, e->third_bytes, DQ_UID, DK_UID, DV_UID);
    return execute(e, stream, pack, workspace, "SDPA backward");
}

}  // extern "C"
