// Empty library target: lets the agent name this crate as a build dependency so cargo
// rebuilds the agent when the programs change (see aya-build).
#![no_std]
