// Bindings: (to be written)
#include "bind_common.hpp"

namespace ringattn::python {

void register_ring(py::module_& m) {}

}  // namespace ringattn::python
