// Command-line options declared once per field (after gemma.cpp's ArgsBase::ForEach).
//
// Each subcommand keeps its options in one args struct. The struct's for_each(v) names
// every field once, with its flag name and help text; the field's initial value is the
// default. Option groups shared by several subcommands (MaskArgs, KernelArgs, HeadArgs,
// ...) are structs of their own whose for_each is called from the command's, so each
// shared flag is written down in one place only:
//
//   struct DemoArgs {
//     std::string q;   // --q, no default: absent unless given
//     int iters = 1;   // --iters, default 1
//     MaskArgs mask;
//     template <class V> void for_each(V& v) {
//       v.group("Run");
//       v(q, {"q", "queries [b, s, h, d]", kNoDefault});
//       v(iters, {"iters", "timed repetitions (median reported)"});
//       v.group("Mask");
//       mask.for_each(v);
//     }
//   };
//
// options(args) turns the list into boost::program_options groups (parsing and --help);
// the mapping from a field's type to the option kind is in OptionsBuilder::operator().
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace ringattn::cli {

namespace po = boost::program_options;

// Marks a flag without a default value (absent from the variables_map unless given).
inline constexpr bool kNoDefault = true;

// One flag: its name without "--", its help text, and whether it has no default.
struct Flag {
  const char* name;
  const char* help;
  bool no_default = false;
};

// The visitor that builds the program_options description from an args struct:
//   bool              -> switch (--causal)
//   std::vector<int>  -> several values after one flag (--window L R)
//   anything else     -> one value, default = the field's current value unless
//                        flagged kNoDefault
class OptionsBuilder {
 public:
  // Flags visited from now on go into a new group with this caption (printed by --help).
  void group(const char* caption) { groups_.emplace_back(caption); }

  template <class T>
  void operator()(T& field, const Flag& f) {
    if (groups_.empty()) groups_.emplace_back();
    auto add = groups_.back().add_options();
    if constexpr (std::is_same_v<T, bool>) {
      add(f.name, po::bool_switch(&field), f.help);
    } else if constexpr (std::is_same_v<T, std::vector<int>>) {
      add(f.name, po::value<T>(&field)->multitoken(), f.help);
    } else if (f.no_default) {
      add(f.name, po::value<T>(&field), f.help);
    } else {
      add(f.name, po::value<T>(&field)->default_value(field), f.help);
    }
  }

  po::options_description all() const {
    if (groups_.size() == 1) return groups_[0];  // printed as the one group it is
    po::options_description all;
    for (const auto& g : groups_) all.add(g);
    return all;
  }

 private:
  std::vector<po::options_description> groups_;
};

// The program_options description of args.for_each: parsing writes into `args` itself,
// which must outlive the parse.
template <class Args>
po::options_description options(Args& args) {
  OptionsBuilder b;
  args.for_each(b);
  return b.all();
}

// Whether flag `name` was given on the command line (not merely defaulted).
inline bool given(const po::variables_map& vm, const char* name) {
  return vm.count(name) > 0 && !vm[name].defaulted();
}

// ---- flags shared by several subcommands ----

// Query/key heads and head dims of the synthetic modes (ring, decode, session).
struct HeadArgs {
  int heads = 8;
  int kv_heads = 0;  // 0 = heads
  int dim = 128;
  int dim_v = 0;  // 0 = dim

  template <class V>
  void for_each(V& v) {
    v(heads, {"heads", "query heads h"});
    v(kv_heads, {"kv-heads", "key/value heads h_k (0 = h)"});
    v(dim, {"dim", "head dim d"});
    v(dim_v, {"dim-v", "value head dim d_v (0 = d)"});
  }
  // The "0 = same as" defaults resolved.
  void resolve() {
    if (kv_heads == 0) kv_heads = heads;
    if (dim_v == 0) dim_v = dim;
  }
};

// Single flags that several subcommands declare with the same meaning.
inline constexpr Flag kBatchFlag{"batch", "sequences"};
inline constexpr Flag kSeedFlag{"seed", "random seed"};
inline constexpr Flag kItersFlag{"iters", "timed repetitions (median reported)"};
inline constexpr Flag kJsonFlag{"json", "print the result as one JSON object"};

}  // namespace ringattn::cli
