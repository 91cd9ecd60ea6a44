// Command tlogcheck checks, with the Go project's reference implementations
// (golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog), that a
// transparency log speaks c2sp.org/signed-note, c2sp.org/tlog-checkpoint,
// c2sp.org/tlog-cosignature and c2sp.org/tlog-tiles:
//
//	tlogcheck -vkey FILE -url BASE [-witness-vkey FILE]... [-quorum K]
//	          [-old-size N -old-root BASE64]
//
// It fetches BASE/checkpoint and opens it with note.Open: the log's signature
// (the vkey in FILE, whose name is the origin) and at least K cosignature/v1
// lines by the given witnesses (K defaults to the number of witness keys) are
// required. It then rebuilds the root from the hash tiles BASE/tile/<L>/<N>[.p/<W>]
// (tlog.TileHashReader, tlog.TreeHash), fetches every entry bundle
// BASE/tile/entries/<N>[.p/<W>] up to the checkpoint's size and proves each
// entry's inclusion (tlog.ProveRecord, tlog.CheckRecord); with -old-size and
// -old-root it proves the older tree a prefix of the checkpointed one
// (tlog.ProveTree, tlog.CheckTree).
//
// On success it prints one JSON line {"ok":true,"origin":..,"size":..,
// "entries":..,"cosignatures":..} (with "old_size" when -old-size was
// given) and exits 0; otherwise it prints
// {"ok":false,"error":..} and exits 1 (2 for a usage error).
package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const (
	tileHeight      = 8
	tileWidth       = 1 << tileHeight
	maxVkeyBytes    = 1024
	maxNoteBytes    = 64 * 1024
	maxEntryBytes   = 65535
	maxBundleBytes  = tileWidth * (2 + maxEntryBytes)
	maxTimestamp    = 1<<63 - 1
	cosignatureType = 0x04
	httpTimeout     = 30 * time.Second
)

var (
	keyName = regexp.MustCompile(`^[^\s+]{1,255}$`)
	hex8    = regexp.MustCompile(`^[0-9a-f]{8}$`)
	decimal = regexp.MustCompile(`^(0|[1-9][0-9]{0,18})$`)
	// emptyRoot is the RFC 6962 root of a tree of no leaves: SHA-256 of nothing.
	emptyRoot = tlog.Hash(sha256.Sum256(nil))
)

// cosigner verifies c2sp.org/tlog-cosignature cosignature/v1 lines (Ed25519).
type cosigner struct {
	name string
	hash uint32
	key  ed25519.PublicKey
}

func (c *cosigner) Name() string    { return c.name }
func (c *cosigner) KeyHash() uint32 { return c.hash }

// Verify checks sig = timestamp (u64, big-endian) || Ed25519 signature over
// "cosignature/v1\ntime <timestamp>\n" followed by the note text msg.
func (c *cosigner) Verify(msg, sig []byte) bool {
	if len(sig) != 8+ed25519.SignatureSize {
		return false
	}
	ts := binary.BigEndian.Uint64(sig[:8])
	if ts > maxTimestamp {
		return false
	}
	signed := append([]byte(fmt.Sprintf("cosignature/v1\ntime %d\n", ts)), msg...)
	return ed25519.Verify(c.key, signed, sig[8:])
}

// cosignerKeyHash is SHA-256(name || 0x0A || 0x04 || public key)[:4], big-endian.
func cosignerKeyHash(name string, key []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name))
	h.Write([]byte{'\n', cosignatureType})
	h.Write(key)
	return binary.BigEndian.Uint32(h.Sum(nil)[:4])
}

// parseWitnessVkey reads <name>+<8 hex key ID>+<base64(0x04 || 32-byte key)>.
func parseWitnessVkey(vkey string) (*cosigner, error) {
	parts := strings.SplitN(vkey, "+", 3)
	if len(parts) != 3 {
		return nil, errors.New("not <name>+<key ID>+<key>")
	}
	name, id, material := parts[0], parts[1], parts[2]
	if !keyName.MatchString(name) {
		return nil, fmt.Errorf("key name %q: 1 to 255 characters, no spaces and no '+'", name)
	}
	if !hex8.MatchString(id) {
		return nil, fmt.Errorf("key ID %q is not 8 lowercase hex characters", id)
	}
	raw, err := base64.StdEncoding.Strict().DecodeString(material)
	if err != nil || base64.StdEncoding.EncodeToString(raw) != material {
		return nil, errors.New("key material is not canonical base64")
	}
	if len(raw) != 1+ed25519.PublicKeySize {
		return nil, fmt.Errorf("key material is %d bytes, not a type byte and 32 bytes", len(raw))
	}
	if raw[0] != cosignatureType {
		return nil, fmt.Errorf("signature type 0x%02x, not 0x04 (cosignature/v1)", raw[0])
	}
	key := ed25519.PublicKey(raw[1:])
	hash := cosignerKeyHash(name, key)
	if want := fmt.Sprintf("%08x", hash); want != id {
		return nil, fmt.Errorf("key ID %s is not the ID of its key (%s)", id, want)
	}
	return &cosigner{name: name, hash: hash, key: key}, nil
}

func readSmallFile(path string, limit int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return "", err
	}
	if int64(len(data)) > limit {
		return "", fmt.Errorf("%s: larger than %d bytes", path, limit)
	}
	return strings.TrimSpace(string(data)), nil
}

// fetcher GETs paths under a base URL, each response bounded in size.
type fetcher struct {
	base   string
	client *http.Client
}

func (f *fetcher) get(path string, limit int64) ([]byte, error) {
	url := f.base + "/" + path
	resp, err := f.client.Get(url)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: HTTP %d", url, resp.StatusCode)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", url, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("GET %s: larger than %d bytes", url, limit)
	}
	return data, nil
}

// c2spPath maps x/mod's tile/8/<L>/<N> and tile/8/data/<N> to c2sp.org/tlog-tiles paths.
func c2spPath(t tlog.Tile) (string, error) {
	p := t.Path()
	prefix := fmt.Sprintf("tile/%d/", tileHeight)
	if t.H != tileHeight || !strings.HasPrefix(p, prefix) {
		return "", fmt.Errorf("tile %v: height %d, not %d", p, t.H, tileHeight)
	}
	rest := p[len(prefix):]
	if strings.HasPrefix(rest, "data/") {
		return "tile/entries/" + rest[len("data/"):], nil
	}
	return "tile/" + rest, nil
}

// tileReader is a tlog.TileReader over HTTP; tiles are kept in memory once read.
type tileReader struct {
	f     *fetcher
	cache map[tlog.Tile][]byte
}

func (r *tileReader) Height() int { return tileHeight }

func (r *tileReader) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		if data, ok := r.cache[t]; ok {
			out[i] = data
			continue
		}
		path, err := c2spPath(t)
		if err != nil {
			return nil, err
		}
		want := t.W * tlog.HashSize
		data, err := r.f.get(path, int64(want))
		if err != nil {
			return nil, err
		}
		if len(data) != want {
			return nil, fmt.Errorf("tile %s: %d bytes, expected %d", path, len(data), want)
		}
		r.cache[t] = data
		out[i] = data
	}
	return out, nil
}

func (r *tileReader) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

// memoReader keeps the hashes another tlog.HashReader returned, so that the proofs of
// neighbouring entries, which share most of their hashes, ask it only once for each.
type memoReader struct {
	r    tlog.HashReader
	memo map[int64]tlog.Hash
}

func (m *memoReader) ReadHashes(indexes []int64) ([]tlog.Hash, error) {
	var missing []int64
	asked := map[int64]bool{}
	for _, x := range indexes {
		if _, ok := m.memo[x]; !ok && !asked[x] {
			asked[x] = true
			missing = append(missing, x)
		}
	}
	if len(missing) > 0 {
		got, err := m.r.ReadHashes(missing)
		if err != nil {
			return nil, err
		}
		if len(got) != len(missing) {
			return nil, fmt.Errorf("%d hashes read for %d indexes", len(got), len(missing))
		}
		for i, x := range missing {
			m.memo[x] = got[i]
		}
	}
	out := make([]tlog.Hash, len(indexes))
	for i, x := range indexes {
		out[i] = m.memo[x]
	}
	return out, nil
}

// withinTile lists the stored-hash indexes of the complete subtrees of leaves
// [start, start+width) below tile level 1: what the inclusion proofs of those leaves need
// from their own level-0 tile.
func withinTile(start, width int64) []int64 {
	var out []int64
	for level := 0; level < tileHeight; level++ {
		for n := start >> level; n < (start+width)>>level; n++ {
			out = append(out, tlog.StoredHashIndex(level, n))
		}
	}
	return out
}

// parseCheckpoint reads the three lines of a c2sp.org/tlog-checkpoint note text.
func parseCheckpoint(text string) (origin string, size int64, root tlog.Hash, err error) {
	lines := strings.Split(text, "\n")
	if len(lines) != 4 || lines[3] != "" {
		return "", 0, root, errors.New("checkpoint: not exactly an origin, a size and a root hash line")
	}
	origin = lines[0]
	if !keyName.MatchString(origin) {
		return "", 0, root, fmt.Errorf("checkpoint: origin %q is not a valid key name", origin)
	}
	if !decimal.MatchString(lines[1]) {
		return "", 0, root, fmt.Errorf("checkpoint: size %q is not a decimal without leading zeros", lines[1])
	}
	size, err = strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return "", 0, root, fmt.Errorf("checkpoint: size %q: %v", lines[1], err)
	}
	root, err = parseRoot(lines[2])
	if err != nil {
		return "", 0, root, fmt.Errorf("checkpoint: root: %v", err)
	}
	return origin, size, root, nil
}

func parseRoot(s string) (tlog.Hash, error) {
	var h tlog.Hash
	raw, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil || base64.StdEncoding.EncodeToString(raw) != s {
		return h, fmt.Errorf("%q is not canonical base64", s)
	}
	if len(raw) != tlog.HashSize {
		return h, fmt.Errorf("%d bytes, not %d", len(raw), tlog.HashSize)
	}
	copy(h[:], raw)
	return h, nil
}

// decodeBundle splits an entry bundle into exactly want entries (uint16 length || bytes each).
func decodeBundle(data []byte, want int) ([][]byte, error) {
	var entries [][]byte
	for len(entries) < want {
		if len(data) < 2 {
			return nil, fmt.Errorf("%d entries, expected %d", len(entries), want)
		}
		n := int(binary.BigEndian.Uint16(data))
		data = data[2:]
		if len(data) < n {
			return nil, fmt.Errorf("entry %d is truncated", len(entries))
		}
		entries = append(entries, data[:n])
		data = data[n:]
	}
	if len(data) != 0 {
		return nil, fmt.Errorf("%d trailing bytes after %d entries", len(data), want)
	}
	return entries, nil
}

type witnessFlags []string

func (w *witnessFlags) String() string     { return strings.Join(*w, ",") }
func (w *witnessFlags) Set(v string) error { *w = append(*w, v); return nil }

type result struct {
	OK           bool   `json:"ok"`
	Origin       string `json:"origin,omitempty"`
	Size         int64  `json:"size"`
	Entries      int64  `json:"entries"`
	Cosignatures int    `json:"cosignatures"`
	OldSize      int64  `json:"old_size,omitempty"`
}

type options struct {
	vkeyFile  string
	base      string
	witnesses []string
	quorum    int
	oldSize   int64
	oldRoot   string
}

func check(o options) (*result, error) {
	vkey, err := readSmallFile(o.vkeyFile, maxVkeyBytes)
	if err != nil {
		return nil, fmt.Errorf("log vkey: %v", err)
	}
	logVerifier, err := note.NewVerifier(vkey)
	if err != nil {
		return nil, fmt.Errorf("log vkey %s: %v", o.vkeyFile, err)
	}
	verifiers := []note.Verifier{logVerifier}
	witnesses := map[[2]string]bool{}
	for _, file := range o.witnesses {
		text, err := readSmallFile(file, maxVkeyBytes)
		if err != nil {
			return nil, fmt.Errorf("witness vkey: %v", err)
		}
		c, err := parseWitnessVkey(text)
		if err != nil {
			return nil, fmt.Errorf("witness vkey %s: %v", file, err)
		}
		k := [2]string{c.name, fmt.Sprint(c.hash)}
		if witnesses[k] {
			return nil, fmt.Errorf("witness vkey %s: the same key is given twice", file)
		}
		witnesses[k] = true
		verifiers = append(verifiers, c)
	}
	quorum := o.quorum
	if quorum < 0 {
		quorum = len(o.witnesses)
	}

	f := &fetcher{base: strings.TrimRight(o.base, "/"), client: &http.Client{Timeout: httpTimeout}}
	msg, err := f.get("checkpoint", maxNoteBytes)
	if err != nil {
		return nil, err
	}
	n, err := note.Open(msg, note.VerifierList(verifiers...))
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %v", err)
	}
	logSigned, cosigned := false, 0
	for _, s := range n.Sigs {
		if s.Name == logVerifier.Name() && s.Hash == logVerifier.KeyHash() {
			logSigned = true
		} else if witnesses[[2]string{s.Name, fmt.Sprint(s.Hash)}] {
			cosigned++
		}
	}
	if !logSigned {
		return nil, fmt.Errorf("checkpoint: not signed by the log key %s", logVerifier.Name())
	}
	if cosigned < quorum {
		return nil, fmt.Errorf("checkpoint: %d valid cosignature(s) by the given witnesses, %d needed", cosigned, quorum)
	}
	origin, size, root, err := parseCheckpoint(n.Text)
	if err != nil {
		return nil, err
	}
	if origin != logVerifier.Name() {
		return nil, fmt.Errorf("checkpoint: origin %s is not the log key's name %s", origin, logVerifier.Name())
	}
	res := &result{OK: true, Origin: origin, Size: size, Cosignatures: cosigned}

	if size == 0 {
		if root != emptyRoot {
			return nil, fmt.Errorf("checkpoint: an empty tree's root must be SHA-256 of nothing, not %v", root)
		}
		if o.oldSize != 0 {
			return nil, fmt.Errorf("-old-size %d: the checkpoint's tree is empty", o.oldSize)
		}
		return res, nil
	}

	// TileHashReader authenticates the tiles on the root's path against the root, but (x/mod
	// v0.7.0, unchanged upstream since) its check of the other tiles against their parents
	// starts at index len(stx) of its tile list, skipping some whenever several root-path
	// hashes share a tile (any size that is not a multiple of 256). So no hash it returns is
	// trusted here unless CheckRecord or CheckTree proves it against a signed root.
	tr := &tileReader{f: f, cache: map[tlog.Tile][]byte{}}
	hashes := tlog.TileHashReader(tlog.Tree{N: size, Hash: root}, tr)
	th, err := tlog.TreeHash(size, hashes)
	if err != nil {
		return nil, fmt.Errorf("tree hash of %d leaves from the tiles: %v", size, err)
	}
	if th != root {
		return nil, fmt.Errorf("the tiles give root %v, the checkpoint says %v", th, root)
	}
	proven := &memoReader{r: hashes, memo: map[int64]tlog.Hash{}}

	for b := int64(0); b*tileWidth < size; b++ {
		w := size - b*tileWidth
		if w > tileWidth {
			w = tileWidth
		}
		path, err := c2spPath(tlog.Tile{H: tileHeight, L: -1, N: b, W: int(w)})
		if err != nil {
			return nil, err
		}
		data, err := f.get(path, maxBundleBytes)
		if err != nil {
			return nil, err
		}
		entries, err := decodeBundle(data, int(w))
		if err != nil {
			return nil, fmt.Errorf("entry bundle %s: %v", path, err)
		}
		if _, err := proven.ReadHashes(withinTile(b*tileWidth, w)); err != nil {
			return nil, fmt.Errorf("hashes of tile %d from the tiles: %v", b, err)
		}
		for i, e := range entries {
			index := b*tileWidth + int64(i)
			proof, err := tlog.ProveRecord(size, index, proven)
			if err != nil {
				return nil, fmt.Errorf("entry %d: inclusion proof from the tiles: %v", index, err)
			}
			if err := tlog.CheckRecord(proof, size, root, index, tlog.RecordHash(e)); err != nil {
				return nil, fmt.Errorf("entry %d: not included in the checkpoint's tree: %v", index, err)
			}
			res.Entries++
		}
	}

	if o.oldSize != 0 || o.oldRoot != "" {
		if o.oldSize < 1 || o.oldSize > size {
			return nil, fmt.Errorf("-old-size %d: must be 1 .. the checkpoint's size %d", o.oldSize, size)
		}
		oldRoot, err := parseRoot(o.oldRoot)
		if err != nil {
			return nil, fmt.Errorf("-old-root: %v", err)
		}
		proof, err := tlog.ProveTree(size, o.oldSize, proven)
		if err != nil {
			return nil, fmt.Errorf("consistency proof %d -> %d from the tiles: %v", o.oldSize, size, err)
		}
		if err := tlog.CheckTree(proof, size, root, o.oldSize, oldRoot); err != nil {
			return nil, fmt.Errorf("the tree of %d leaves with root %s is not a prefix of the checkpoint's: %v",
				o.oldSize, o.oldRoot, err)
		}
		res.OldSize = o.oldSize
	}
	return res, nil
}

func main() {
	var o options
	var witnesses witnessFlags
	flag.StringVar(&o.vkeyFile, "vkey", "", "`FILE` holding the log's verifier key (note vkey, type 0x01)")
	flag.StringVar(&o.base, "url", "", "`BASE` URL of the log (BASE/checkpoint, BASE/tile/...)")
	flag.Var(&witnesses, "witness-vkey", "`FILE` holding a witness's verifier key (type 0x04); repeatable")
	flag.IntVar(&o.quorum, "quorum", -1, "cosignatures required of the given witnesses (default: all of them)")
	flag.Int64Var(&o.oldSize, "old-size", 0, "size `N` of an older tree to prove a prefix of the checkpoint's")
	flag.StringVar(&o.oldRoot, "old-root", "", "root hash (`BASE64`) of the older tree")
	flag.Parse()
	o.witnesses = witnesses
	usage := ""
	switch {
	case flag.NArg() != 0:
		usage = fmt.Sprintf("unexpected arguments %q", flag.Args())
	case o.vkeyFile == "" || o.base == "":
		usage = "-vkey and -url are required"
	case o.quorum < -1 || o.quorum > len(witnesses):
		usage = fmt.Sprintf("-quorum %d: must be 0 .. the %d witness key(s) given", o.quorum, len(witnesses))
	case (o.oldSize != 0) != (o.oldRoot != ""):
		usage = "-old-size and -old-root go together"
	}
	if usage != "" {
		fmt.Fprintln(os.Stderr, "tlogcheck:", usage)
		flag.Usage()
		os.Exit(2)
	}
	res, err := check(o)
	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	if err != nil {
		_ = enc.Encode(map[string]interface{}{"ok": false, "error": err.Error()})
		os.Stdout.Write(line.Bytes())
		os.Exit(1)
	}
	_ = enc.Encode(res)
	os.Stdout.Write(line.Bytes())
}
