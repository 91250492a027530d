//! The template step between `shaders/*.wgsl` and a shader module: `#include "name"` lines are
//! replaced by library pieces from `shaders/lib/`, and the piece that depends on an optional device
//! feature is picked by [`Caps`]: `reduce` — workgroup reductions through subgroup operations
//! (SUBGROUP) or through shared memory.
//!
//! This file is shared with build.rs, which validates every kernel under every combination of caps
//! with naga, so a composition that fails to compile fails the build.

/// Optional features a composition may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Caps {
    pub subgroups: bool,
}

impl Caps {
    pub const ALL: [Caps; 2] = [Caps { subgroups: false }, Caps { subgroups: true }];
}

/// The library file an `#include "name"` resolves to under `caps`.
pub fn library_path(name: &str, caps: Caps) -> String {
    match name {
        "reduce" if caps.subgroups => "lib/reduce_subgroup.wgsl".into(),
        "reduce" => "lib/reduce_shared.wgsl".into(),
        other => format!("lib/{other}.wgsl"),
    }
}

/// Resolves the includes of `kernel` (each library piece at most once). `lookup` maps a path under
/// `shaders/` to its text.
pub fn compose(
    kernel: &str,
    caps: Caps,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    // naga 30 parses subgroup builtins without `enable subgroups;` (and rejects the directive);
    // the device feature is what gates them.
    let mut out = String::new();
    let mut seen = Vec::new();
    expand(kernel, caps, lookup, &mut seen, &mut out, 0)?;
    Ok(out)
}

fn expand(
    text: &str,
    caps: Caps,
    lookup: &dyn Fn(&str) -> Option<String>,
    seen: &mut Vec<String>,
    out: &mut String,
    depth: usize,
) -> Result<(), String> {
    if depth > 8 {
        return Err("#include nested too deeply".into());
    }
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("#include") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let name = rest.trim().trim_matches('"');
        let path = library_path(name, caps);
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let piece = lookup(&path).ok_or_else(|| format!("#include \"{name}\": no {path}"))?;
        expand(&piece, caps, lookup, seen, out, depth + 1)?;
    }
    Ok(())
}
