//! Packet tests of 802.1Q and 802.1ad tagged frames: balanced like untagged ones, with the tag
//! stack kept exactly as it came. This kernel has no VLAN devices, so only `BPF_PROG_TEST_RUN`
//! can carry tagged frames to the program. Needs root (see `lb_tests::skip_unless_privileged`).

use lb_common::counter;
use lb_tests::{packet::*, skip_unless_privileged};

#[test]
fn tagged_frames_are_balanced_with_their_tags_kept() {
    if !skip_unless_privileged("tagged_frames_are_balanced_with_their_tags_kept") {
        return;
    }
    let mut fixture = Fixture::new();
    let stacks: [&[([u8; 2], u16)]; 2] = [&[(DOT1Q, 0x2064)], &[(DOT1AD, 0x0fff), (DOT1Q, 0xa001)]];
    for (index, tags) in stacks.iter().enumerate() {
        let port = 46000 + index as u16;
        let syn = Tcp::from_client(80, port).frame();
        let (verdict, out) = fixture.run(&vlan_tagged(&syn, tags), fixture.pub_ifindex);
        assert_eq!(verdict, XDP_REDIRECT, "{} tag(s)", tags.len());
        // Compare without the tags, with the untagged expectation, then the tags themselves.
        // Round robin: the first flow goes to backend A, the second to B.
        let (backend, backend_mac) = if index == 0 {
            (BACKEND_A, BACKEND_A_MAC)
        } else {
            (BACKEND_B, BACKEND_B_MAC)
        };
        let expected = expected_forward(&syn, BACK_MAC, backend_mac, backend, 8080);
        let offset = 4 * tags.len();
        let mut untagged = out[..12].to_vec();
        untagged.extend_from_slice(&out[12 + offset..]);
        assert_frames_equal(&untagged, &expected, "tagged SYN");
        assert_eq!(
            &out[12..12 + offset],
            &vlan_tagged(&syn, tags)[12..12 + offset],
            "tags kept"
        );

        // The backend's reply, tagged the same way, goes back translated, tags kept.
        let reply = Tcp {
            src_mac: backend_mac,
            dst_mac: BACK_MAC,
            src: backend,
            dst: CLIENT,
            src_port: 8080,
            dst_port: port,
            syn: false,
            payload: b"tagged reply",
        }
        .frame();
        let (verdict, out) = fixture.run(&vlan_tagged(&reply, tags), fixture.back_ifindex);
        assert_eq!(verdict, XDP_REDIRECT);
        let mut untagged = out[..12].to_vec();
        untagged.extend_from_slice(&out[12 + offset..]);
        let mut expected = reply.clone();
        expected[0..6].copy_from_slice(&CLIENT_MAC);
        expected[6..12].copy_from_slice(&PUB_MAC);
        expected[26..30].copy_from_slice(&VIP);
        expected[34..36].copy_from_slice(&80u16.to_be_bytes());
        assert_frames_equal(&untagged, &with_fresh_checksums(expected), "tagged reply");
        assert_eq!(
            &out[12..12 + offset],
            &vlan_tagged(&reply, tags)[12..12 + offset]
        );
    }
    // One backend per flow, round robin: both flows were new.
    assert_eq!(fixture.counter(counter::FLOW_MISS_NEW), 2);
}

#[test]
fn odd_tag_stacks_pass_or_drop_untouched() {
    if !skip_unless_privileged("odd_tag_stacks_pass_or_drop_untouched") {
        return;
    }
    let mut fixture = Fixture::new();
    let syn = Tcp::from_client(80, 47000).frame();
    let three = vlan_tagged(&syn, &[(DOT1AD, 1), (DOT1Q, 2), (DOT1Q, 3)]);
    let (verdict, out) = fixture.run(&three, fixture.pub_ifindex);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &three),
        "three tags: not ours, passed"
    );
    assert_eq!(fixture.counter(counter::PASS_NOT_IP), 1);

    let cut = vlan_tagged(&syn, &[(DOT1Q, 7)])[..16].to_vec();
    let (verdict, out) = fixture.run(&cut, fixture.pub_ifindex);
    assert_eq!((verdict, &out), (XDP_DROP, &cut), "a tag cut short");
    assert_eq!(fixture.counter(counter::DROP_MALFORMED_ETHERNET), 1);
}
