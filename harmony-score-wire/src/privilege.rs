//! Privileges a Score may need on a device, granted or refused by the device owner's policy.

/// Something a Score does that reaches beyond the files and resources it
/// names, which only the device's own policy may allow (the agent's
/// `[policy]` table). A Score declares what it needs in
/// [`DeviceScore::privileges`](crate::DeviceScore::privileges); the agent
/// refuses a whole document when any Score needs a privilege the policy
/// does not grant, before anything of it runs. Whoever wrote or signed the
/// document has no say.
///
/// New privileges are added as new Scores need them; a device that does not
/// know one refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Privilege {
    /// A file or directory mode with the setuid or setgid bit (`0o6000`):
    /// whoever runs the file runs it as its owner or group.
    SetuidMode,
    /// A container run privileged: every capability and the host's devices.
    PrivilegedContainer,
    /// A container in the host's network namespace.
    HostNetwork,
    /// A system service: a unit the init system runs as it says (its
    /// `ExecStart` is a command line, run as root unless it says otherwise).
    SystemService,
    /// Installing or removing packages: their maintainer scripts run as root.
    PackageChange,
}

impl Privilege {
    /// The name in statuses and logs (`setuid_mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::SetuidMode => "setuid_mode",
            Privilege::PrivilegedContainer => "privileged_container",
            Privilege::HostNetwork => "host_network",
            Privilege::SystemService => "system_service",
            Privilege::PackageChange => "package_change",
        }
    }
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The setuid and setgid bits of a mode.
pub const SETUID_SETGID_BITS: u32 = 0o6000;

/// The privilege a `mode` needs: [`Privilege::SetuidMode`] when it sets
/// setuid or setgid.
pub fn mode_privilege(mode: Option<u32>) -> Option<Privilege> {
    mode.filter(|m| m & SETUID_SETGID_BITS != 0).map(|_| Privilege::SetuidMode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mode_with_setuid_or_setgid_needs_the_setuid_privilege() {
        for mode in [0o4755, 0o2755, 0o6711] {
            assert_eq!(mode_privilege(Some(mode)), Some(Privilege::SetuidMode), "{mode:o}");
        }
        for mode in [None, Some(0o755), Some(0o1777)] {
            assert_eq!(mode_privilege(mode), None, "{mode:?}");
        }
        assert_eq!(Privilege::PrivilegedContainer.to_string(), "privileged_container");
        assert_eq!(Privilege::HostNetwork.as_str(), "host_network");
    }
}
