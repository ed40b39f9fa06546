//! Test certificates: CAs and the certificates they sign, written as PEM files into a fresh
//! temp dir (rcgen; nothing from the system).

use std::path::Path;

pub use rcgen::ExtendedKeyUsagePurpose as Usage;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of one test's certificates.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `NAME.pem` and `NAME-key.pem`.
    pub fn cert(&self, name: &str) -> (String, String) {
        (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        )
    }

    /// A new CA named `cn`, its certificate written as `FILE` when given; the issuer signs leaves.
    pub fn ca(&self, cn: &str, file: Option<&str>) -> Issuer<'static, KeyPair> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        if let Some(file) = file {
            std::fs::write(self.dir.path().join(file), cert.pem()).unwrap();
        }
        Issuer::new(p, key)
    }

    /// `NAME.pem` / `NAME-key.pem`: a certificate signed by `issuer` with common name `cn` (none
    /// when empty), subject alternative names `sans` and extended key usages `usages`.
    pub fn leaf(
        &self,
        name: &str,
        cn: &str,
        sans: &[&str],
        usages: &[Usage],
        issuer: &Issuer<'static, KeyPair>,
    ) {
        write_leaf(self.dir.path(), name, cn, sans, usages, issuer)
    }
}

fn write_leaf(
    dir: &Path,
    name: &str,
    cn: &str,
    sans: &[&str],
    usages: &[Usage],
    issuer: &Issuer<'static, KeyPair>,
) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    // rcgen names a certificate "rcgen self signed cert" unless told otherwise.
    p.distinguished_name = DistinguishedName::new();
    if cn.is_empty() {
        p.distinguished_name
            .push(DnType::OrganizationName, "no common name");
    } else {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = usages.to_vec();
    let cert = p.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
}
