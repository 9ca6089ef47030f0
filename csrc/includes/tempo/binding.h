// What the Python module of every op family exports besides its kernels.
#pragma once

#include <torch/extension.h>

#include "tempo/alloc.h"

// The op builders define TEMPO_SOURCE_DIGEST: 64 bits of the SHA-256 of the family's sources and
// headers (tempo_ds/op_builder/builder.py, source_digest). A prebuilt module whose digest differs
// from the sources shipped beside the package was built from other code, and is not loaded.
#ifndef TEMPO_SOURCE_DIGEST
#error "build the tempo_ds ops through tempo_ds.op_builder, which defines TEMPO_SOURCE_DIGEST"
#endif

namespace tempo {

inline void bind_common(pybind11::module_& m) {
    m.def("set_poison", [](bool on) { poison_outputs() = on; }, "Fill fresh outputs with NaN (tests)");
    m.attr("source_digest") = pybind11::int_(static_cast<unsigned long long>(TEMPO_SOURCE_DIGEST));
}

}  // namespace tempo
