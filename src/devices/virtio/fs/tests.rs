use super::*;

#[test]
fn parses_fs_options() {
    assert_eq!(
        parse_fs_option("tag=share,path=/srv/x").unwrap(),
        FsConfig {
            tag: "share".into(),
            source: FsSource::Dir {
                path: "/srv/x".into(),
                readonly: false,
                submounts: true
            }
        }
    );
    assert_eq!(
        parse_fs_option("path=/srv/x,readonly=on,tag=ro")
            .unwrap()
            .source,
        FsSource::Dir {
            path: "/srv/x".into(),
            readonly: true,
            submounts: true
        }
    );
    assert_eq!(
        parse_fs_option("tag=s,socket=/run/fs.sock").unwrap().source,
        FsSource::Socket("/run/fs.sock".into())
    );
    for (bad, words) in [
        ("path=/x", "missing tag"),
        ("tag=a", "path=DIR"),
        ("tag=a,path=/x,socket=/y", "exclude"),
        ("tag=a,socket=/y,readonly=on", "readonly=on is for path="),
        ("tag=,path=/x", "1 to 36 bytes"),
        (
            "tag=0123456789012345678901234567890123456,path=/x",
            "1 to 36 bytes",
        ),
        ("tag=a,path=/x,readonly=yes", "readonly=\"yes\""),
        ("tag=a,path=/x,cache=always", "unknown key"),
        ("tag=a,tag=b,path=/x", "tag given twice"),
    ] {
        let e = parse_fs_option(bad).expect_err(bad).to_string();
        assert!(e.contains(words), "{bad:?}: {e}");
    }
    let list = [
        parse_fs_option("tag=a,path=/x").unwrap(),
        parse_fs_option("tag=a,path=/y").unwrap(),
    ];
    assert!(check_fs_list(&list)
        .unwrap_err()
        .to_string()
        .contains("\"a\""));
}

#[test]
fn a_missing_folder_is_named() {
    let e = Fs::new(&parse_fs_option("tag=a,path=/nonexistent-ferrovm-dir").unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/nonexistent-ferrovm-dir") && e.contains("No such file"),
        "{e}"
    );
}

fn virtiofsd_installed() {
    assert!(
        find_program("virtiofsd", &["/usr/libexec", "/usr/lib/qemu"]).is_some(),
        "virtiofsd is not installed: run scripts/setup-host"
    );
}

#[test]
fn real_virtiofsd_negotiates_and_stops_with_the_device() {
    virtiofsd_installed();
    let dir = std::env::temp_dir().join(format!("ferrovm-fs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fs = Fs::new(&parse_fs_option(&format!("tag=t,path={}", dir.display())).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let f = fs.features();
    assert_ne!(f & super::super::VIRTIO_F_VERSION_1, 0, "features {f:#x}");
    let mut tag = [0u8; 40];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..2], b"t\0");
    assert_eq!(u32::from_le_bytes(tag[36..].try_into().unwrap()), 1);
    let pid = fs._daemon.as_ref().unwrap().child.id();
    drop(fs);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "virtiofsd outlived the device"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

mod orphaned {
    use super::super::*;
    use crate::devices::virtio::test_chains::add_chain as chain;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Requests of a dead daemon get `fuse_out_header { 16, -EIO, unique }`; a FORGET (no
    /// reply buffer) and a header split over descriptors are handled; nothing panics on a
    /// request that is too short.
    #[test]
    fn fuse_requests_fail_with_eio() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let mut header = [0u8; 40];
        header[0..4].copy_from_slice(&40u32.to_le_bytes());
        header[4..8].copy_from_slice(&1u32.to_le_bytes()); // FUSE_LOOKUP
        header[8..16].copy_from_slice(&0xdead_beef_1234u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x1_0000)).unwrap();
        // 0: header in one descriptor, reply buffer of 128 bytes
        chain(&q, 0, &[(0x1_0000, 40, false), (0x2_0000, 128, true)]);
        // 2: header split 10 + 30 bytes
        chain(
            &q,
            2,
            &[
                (0x1_0000, 10, false),
                (0x1_000a, 30, false),
                (0x3_0000, 64, true),
            ],
        );
        // 5: FORGET: no reply buffer
        chain(&q, 5, &[(0x1_0000, 40, false)]);
        // 6: too short to hold `unique`
        chain(&q, 6, &[(0x1_0000, 8, false), (0x4_0000, 64, true)]);
        let mut queue: Queue = q.create_queue().unwrap();
        let mut f = FuseEio;
        let mut lens = Vec::new();
        while let Some(c) = queue.pop_descriptor_chain(&mem) {
            lens.push(f.fail(&mem, c));
        }
        assert_eq!(lens, vec![16, 16, 0, 0]);
        for at in [0x2_0000u64, 0x3_0000] {
            let mut reply = [0u8; 16];
            mem.read_slice(&mut reply, GuestAddress(at)).unwrap();
            assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 16);
            assert_eq!(
                i32::from_le_bytes(reply[4..8].try_into().unwrap()),
                -libc::EIO
            );
            assert_eq!(&reply[8..16], &header[8..16]);
        }
        assert_eq!(queue.next_avail(), 4);
    }
}
