//! The cloud-init NoCloud seed: `--cloud-init user-data=FILE[,meta-data=FILE]
//! [,network-config=FILE]`, or the shortcuts `--ssh-key PATH.pub` / `--password PW`, become a
//! read-only FAT16 disk labelled CIDATA (built in memory), which cloud-init in a stock Debian
//! or Ubuntu cloud image finds by its label and reads as its configuration.

use std::path::{Path, PathBuf};

/// What the seed holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudInit {
    pub user_data: Option<PathBuf>,
    pub meta_data: Option<PathBuf>,
    pub network_config: Option<PathBuf>,
    /// `--ssh-key`: public keys for the image's default user.
    pub ssh_keys: Vec<PathBuf>,
    /// `--password`: the default user's password (SSH password login enabled).
    pub password: Option<String>,
}

/// Why the seed cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("invalid --cloud-init `{0}`: {1}")]
    Option(String, String),
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot build the cloud-init seed")]
    Vfat(#[from] crate::disk::vfat::VfatError),
}

/// Parses `user-data=FILE[,meta-data=FILE][,network-config=FILE]` into `ci`.
pub fn parse_option(s: &str, ci: &mut CloudInit) -> Result<(), CloudInitError> {
    let bad = |why: String| CloudInitError::Option(s.to_string(), why);
    for item in s.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("`{item}` is not KEY=FILE")))?;
        let slot = match k {
            "user-data" => &mut ci.user_data,
            "meta-data" => &mut ci.meta_data,
            "network-config" => &mut ci.network_config,
            _ => {
                return Err(bad(format!(
                    "unknown key `{k}` (user-data, meta-data, network-config)"
                )))
            }
        };
        if v.is_empty() || slot.replace(PathBuf::from(v)).is_some() {
            return Err(bad(format!("`{k}` is empty or given twice")));
        }
    }
    Ok(())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CloudInitError> {
    std::fs::read(path).map_err(|source| CloudInitError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// One OpenSSH public key line, checked.
fn public_key(path: &Path) -> Result<String, CloudInitError> {
    let text = String::from_utf8(read("SSH public key", path)?)
        .map_err(|_| CloudInitError::Invalid(format!("{} is not text", path.display())))?;
    if text.contains("PRIVATE KEY") {
        return Err(CloudInitError::Invalid(format!(
            "{} is a private key: give the public one (.pub)",
            path.display()
        )));
    }
    let key = text.trim();
    let known = ["ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-"];
    if key.lines().count() != 1 || !known.iter().any(|p| key.starts_with(p)) {
        return Err(CloudInitError::Invalid(format!(
            "{} is not an OpenSSH public key (one line starting ssh-..., ecdsa-...)",
            path.display()
        )));
    }
    Ok(key.to_string())
}

/// A YAML double-quoted string.
fn yaml_quote(s: &str) -> String {
    let mut q = String::from('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The user-data the shortcuts stand for: keys and password for the default user.
fn shortcut_user_data(ci: &CloudInit) -> Result<Vec<u8>, CloudInitError> {
    let mut y = String::from("#cloud-config\n# from ferrovm --ssh-key/--password\n");
    if !ci.ssh_keys.is_empty() {
        y.push_str("ssh_authorized_keys:\n");
        for k in &ci.ssh_keys {
            y.push_str(&format!("  - {}\n", yaml_quote(&public_key(k)?)));
        }
    }
    if let Some(pw) = &ci.password {
        if pw.is_empty() {
            return Err(CloudInitError::Invalid("--password is empty".into()));
        }
        y.push_str(&format!(
            "password: {}\nchpasswd:\n  expire: false\nssh_pwauth: true\n",
            yaml_quote(pw)
        ));
    }
    Ok(y.into_bytes())
}

/// A stable instance id from the configuration: changing it makes cloud-init apply the
/// new configuration on the next boot, booting again with the same one does not.
fn instance_id(parts: &[&[u8]]) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("iid-ferrovm-{h:016x}")
}

/// The seed's files: user-data, meta-data and network-config when given.
pub fn files(ci: &CloudInit) -> Result<Vec<(&'static str, Vec<u8>)>, CloudInitError> {
    let shortcuts = !ci.ssh_keys.is_empty() || ci.password.is_some();
    let user = match (&ci.user_data, shortcuts) {
        (Some(_), true) => {
            return Err(CloudInitError::Invalid(
                "give either user-data= or --ssh-key/--password (put keys and passwords in \
                 your user-data)"
                    .into(),
            ))
        }
        (Some(p), false) => read("user-data", p)?,
        (None, true) => shortcut_user_data(ci)?,
        (None, false) => b"#cloud-config\n{}\n".to_vec(),
    };
    let net = ci
        .network_config
        .as_deref()
        .map(|p| read("network-config", p))
        .transpose()?;
    let meta = match &ci.meta_data {
        Some(p) => read("meta-data", p)?,
        None => format!(
            "instance-id: {}\nlocal-hostname: ferrovm\n",
            instance_id(&[&user, net.as_deref().unwrap_or_default()])
        )
        .into_bytes(),
    };
    let mut out = vec![("user-data", user), ("meta-data", meta)];
    if let Some(n) = net {
        out.push(("network-config", n));
    }
    Ok(out)
}

/// The seed disk image.
pub fn seed_image(ci: &CloudInit) -> Result<Vec<u8>, CloudInitError> {
    let files = files(ci)?;
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    Ok(crate::disk::vfat::build("cidata", &refs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
        let d = vmm_sys_util::tempdir::TempDir::new_with_prefix("/var/tmp/ferrovm-ci").unwrap();
        let p = d.as_path().join(name);
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn shortcuts_make_a_cloud_config_for_the_default_user() {
        let (_d, key) = tmp("id.pub", "ssh-ed25519 AAAAC3Nza user@host\n");
        let ci = CloudInit {
            ssh_keys: vec![key],
            password: Some("pa\"ss".into()),
            ..CloudInit::default()
        };
        let f = files(&ci).unwrap();
        let user = String::from_utf8(f[0].1.clone()).unwrap();
        assert!(user.starts_with("#cloud-config\n"), "{user}");
        assert!(
            user.contains("  - \"ssh-ed25519 AAAAC3Nza user@host\"\n"),
            "{user}"
        );
        assert!(user.contains("password: \"pa\\\"ss\"\n") && user.contains("ssh_pwauth: true"));
        let meta = String::from_utf8(f[1].1.clone()).unwrap();
        assert!(meta.starts_with("instance-id: iid-ferrovm-"), "{meta}");
        // The same configuration gives the same instance id.
        assert_eq!(files(&ci).unwrap()[1].1, f[1].1);
        assert!(seed_image(&ci).unwrap().len() >= 4 << 20);
    }

    #[test]
    fn mistakes_are_one_line_errors() {
        let (_d, private) = tmp("id", "-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n");
        let ci = CloudInit {
            ssh_keys: vec![private],
            ..CloudInit::default()
        };
        assert!(files(&ci).unwrap_err().to_string().contains("private key"));
        let (_d2, ud) = tmp("user-data", "#cloud-config\n");
        let ci = CloudInit {
            user_data: Some(ud),
            password: Some("x".into()),
            ..CloudInit::default()
        };
        assert!(files(&ci)
            .unwrap_err()
            .to_string()
            .contains("either user-data="));
        let mut ci = CloudInit::default();
        assert!(parse_option("user-data=a,bogus=b", &mut ci).is_err());
        assert!(parse_option("user-data=a,user-data=b", &mut CloudInit::default()).is_err());
        parse_option("user-data=/u,meta-data=/m,network-config=/n", &mut ci).unwrap_err();
        let mut ci = CloudInit::default();
        parse_option("user-data=/u,meta-data=/m,network-config=/n", &mut ci).unwrap();
        assert_eq!(ci.network_config.as_deref(), Some(Path::new("/n")));
        let e = files(&ci).unwrap_err().to_string();
        assert!(e.contains("cannot read user-data /u"), "{e}");
    }
}
