//! The one thing a quorum node cannot give the images over it: a folder. A relative name
//! inside such an image (a backing file, a VMDK extent) has nothing to be resolved against.

/// QEMU's words for a relative name that must be resolved against a quorum node.
pub const NO_DIRNAME: &str = "Cannot generate a base directory for quorum nodes";

/// True when `name`, read from an image, must be resolved against its image's folder (not
/// absolute, no protocol prefix): over a quorum node that fails with [`NO_DIRNAME`].
pub fn needs_dirname(name: &str) -> bool {
    !name.starts_with('/') && !crate::gate::is_protocol_path(name)
}
