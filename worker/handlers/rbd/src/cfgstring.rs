//! The tcmu-runner-compatible rbd cfgstring: `rbd/POOL/IMAGE[;osd_op_timeout=N][;conf=PATH][;id=NAME]`
//! (the leading `rbd/` is the handler subtype; callers may pass the string with or without it).
//!
//! This module owns parsing only; it must never touch the cluster. Input is untrusted (it comes
//! from configfs): every failure is a typed [`CfgError`].

use std::time::Duration;

/// A parsed rbd cfgstring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdConfig {
    /// The RADOS pool holding the image.
    pub pool: String,
    /// The image name.
    pub image: String,
    /// `osd_op_timeout`: how long librbd waits for an OSD before failing a request.
    pub osd_op_timeout: Option<Duration>,
    /// A ceph.conf path (default: librados' search path).
    pub conf: Option<String>,
    /// The cephx client id without the `client.` prefix (default: `admin`).
    pub id: Option<String>,
}

/// Why a cfgstring was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CfgError {
    #[error("expected rbd/POOL/IMAGE[;option=value...]")]
    Shape,
    #[error("empty pool or image name")]
    EmptyName,
    #[error("names may not contain '@' (snapshots are not served), NUL or '/'")]
    BadName,
    #[error("unknown option {0:?} (known: osd_op_timeout, conf, id)")]
    UnknownOption(String),
    #[error("option {0:?} given twice")]
    Duplicate(&'static str),
    #[error("osd_op_timeout must be a whole number of seconds, got {0:?}")]
    BadTimeout(String),
    #[error("option {0} has an empty or NUL-containing value")]
    BadValue(&'static str),
}

fn name_ok(s: &str) -> Result<String, CfgError> {
    if s.is_empty() {
        return Err(CfgError::EmptyName);
    }
    if s.contains(['@', '\0', '/']) {
        return Err(CfgError::BadName);
    }
    Ok(s.to_owned())
}

fn value_ok(key: &'static str, v: &str) -> Result<String, CfgError> {
    if v.is_empty() || v.contains('\0') {
        Err(CfgError::BadValue(key))
    } else {
        Ok(v.to_owned())
    }
}

/// Parses a cfgstring.
pub fn parse(s: &str) -> Result<RbdConfig, CfgError> {
    let s = s.strip_prefix("rbd/").unwrap_or(s);
    let mut parts = s.split(';');
    let path = parts.next().ok_or(CfgError::Shape)?;
    let (pool, image) = path.split_once('/').ok_or(CfgError::Shape)?;
    let mut cfg = RbdConfig {
        pool: name_ok(pool)?,
        image: name_ok(image)?,
        osd_op_timeout: None,
        conf: None,
        id: None,
    };
    for opt in parts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| CfgError::UnknownOption(opt.to_owned()))?;
        match k {
            "osd_op_timeout" => {
                if cfg.osd_op_timeout.is_some() {
                    return Err(CfgError::Duplicate("osd_op_timeout"));
                }
                let n: u64 = v.parse().map_err(|_| CfgError::BadTimeout(v.to_owned()))?;
                cfg.osd_op_timeout = Some(Duration::from_secs(n));
            }
            "conf" => {
                if cfg.conf.is_some() {
                    return Err(CfgError::Duplicate("conf"));
                }
                cfg.conf = Some(value_ok("conf", v)?);
            }
            "id" => {
                if cfg.id.is_some() {
                    return Err(CfgError::Duplicate("id"));
                }
                cfg.id = Some(value_ok("id", v)?);
            }
            other => return Err(CfgError::UnknownOption(other.to_owned())),
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_string_parses() {
        let c = parse("rbd/rbd/disk1;osd_op_timeout=30;conf=/etc/ceph/x.conf;id=gw").unwrap();
        assert_eq!(c.pool, "rbd");
        assert_eq!(c.image, "disk1");
        assert_eq!(c.osd_op_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.conf.as_deref(), Some("/etc/ceph/x.conf"));
        assert_eq!(c.id.as_deref(), Some("gw"));
    }

    #[test]
    fn without_subtype_prefix() {
        let c = parse("pool/img").unwrap();
        assert_eq!((c.pool.as_str(), c.image.as_str()), ("pool", "img"));
        assert_eq!(c.conf, None);
    }

    #[test]
    fn refusals_are_typed() {
        assert_eq!(parse("rbd/poolonly"), Err(CfgError::Shape));
        assert_eq!(parse("rbd//img"), Err(CfgError::EmptyName));
        assert_eq!(parse("rbd/p/img@snap"), Err(CfgError::BadName));
        assert_eq!(parse("rbd/p/a/b"), Err(CfgError::BadName));
        assert_eq!(
            parse("rbd/p/i;foo=1"),
            Err(CfgError::UnknownOption("foo".into()))
        );
        assert_eq!(
            parse("rbd/p/i;osd_op_timeout=x"),
            Err(CfgError::BadTimeout("x".into()))
        );
        assert_eq!(parse("rbd/p/i;id=a;id=b"), Err(CfgError::Duplicate("id")));
        assert_eq!(parse("rbd/p/i;conf="), Err(CfgError::BadValue("conf")));
    }
}
