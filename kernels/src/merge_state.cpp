// TEMPORARY placeholder: replaced by the merge implementation.
#include "ringattn/merge_state.hpp"
