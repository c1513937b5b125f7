// Bindings: (to be written)
#include "bind_common.hpp"

namespace ringattn::python {

void register_mla(py::module_& m) {}

}  // namespace ringattn::python
