// Command s3server is the S3 server the tests talk to: gofakes3's in-memory backend behind an AWS Signature V4
// check, so a client with wrong credentials is refused the way S3 refuses it (InvalidAccessKeyId,
// SignatureDoesNotMatch, AccessDenied for an unsigned request). gofakes3 itself accepts any request.
//
//	s3server -addr 127.0.0.1:0 -access-key KEY -secret-key SECRET [-bucket NAME]...
//
// Prints "ready http://HOST:PORT" on stdout once it accepts connections, and serves until killed.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

type bucketList []string

func (b *bucketList) String() string     { return strings.Join(*b, ",") }
func (b *bucketList) Set(v string) error { *b = append(*b, v); return nil }

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on (port 0: any free port)")
	accessKey := flag.String("access-key", "", "the only access key accepted (required)")
	secretKey := flag.String("secret-key", "", "its secret key (required)")
	var buckets bucketList
	flag.Var(&buckets, "bucket", "a bucket to create at start (repeatable)")
	flag.Parse()
	if *accessKey == "" || *secretKey == "" {
		log.Fatal("s3server: -access-key and -secret-key are required")
	}

	backend := s3mem.New()
	for _, name := range buckets {
		if err := backend.CreateBucket(name); err != nil {
			log.Fatalf("s3server: creating bucket %s: %v", name, err)
		}
	}
	faker := gofakes3.New(backend, gofakes3.WithLogger(gofakes3.DiscardLog()))
	handler := &sigV4{keys: map[string]string{*accessKey: *secretKey}, next: faker.Server()}

	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("s3server: %v", err)
	}
	fmt.Printf("ready http://%s\n", listener.Addr())
	os.Stdout.Sync()
	log.Fatal(http.Serve(listener, handler))
}

// sigV4 passes on requests signed (Authorization header, AWS4-HMAC-SHA256) with a known access key and its secret.
type sigV4 struct {
	keys map[string]string
	next http.Handler
}

type s3Error struct {
	XMLName  xml.Name `xml:"Error"`
	Code     string   `xml:"Code"`
	Message  string   `xml:"Message"`
	Resource string   `xml:"Resource"`
}

func refuse(w http.ResponseWriter, r *http.Request, code, message string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(http.StatusForbidden)
	if r.Method != http.MethodHead {
		body, _ := xml.Marshal(s3Error{Code: code, Message: message, Resource: r.URL.Path})
		w.Write(append([]byte(xml.Header), body...))
	}
}

func (s *sigV4) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	auth := r.Header.Get("Authorization")
	if auth == "" {
		refuse(w, r, "AccessDenied", "Access Denied")
		return
	}
	fields, ok := parseAuthorization(auth)
	if !ok {
		refuse(w, r, "AccessDenied", "Unsupported or malformed Authorization header")
		return
	}
	credential := strings.SplitN(fields["Credential"], "/", 2)
	secret, known := s.keys[credential[0]]
	if len(credential) != 2 || !known {
		refuse(w, r, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
		return
	}
	scope := credential[1]
	if !hmac.Equal([]byte(signature(r, secret, scope, fields["SignedHeaders"])), []byte(fields["Signature"])) {
		refuse(w, r, "SignatureDoesNotMatch",
			"The request signature we calculated does not match the signature you provided. Check your key and signing method.")
		return
	}
	s.next.ServeHTTP(xmlAsS3Sends{w}, r)
}

// xmlAsS3Sends labels XML the way S3 does (application/xml). gofakes3 writes its error bodies unlabelled, so Go
// sniffs text/xml, and clients such as the MinIO SDK read an error body only when it is labelled application/xml.
type xmlAsS3Sends struct{ http.ResponseWriter }

func (w xmlAsS3Sends) WriteHeader(status int) {
	contentType := w.Header().Get("Content-Type")
	if strings.HasPrefix(contentType, "text/xml") || (contentType == "" && status >= 300) {
		w.Header().Set("Content-Type", "application/xml")
	}
	w.ResponseWriter.WriteHeader(status)
}

// parseAuthorization splits "AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…".
func parseAuthorization(header string) (map[string]string, bool) {
	rest, found := strings.CutPrefix(header, "AWS4-HMAC-SHA256 ")
	if !found {
		return nil, false
	}
	fields := map[string]string{}
	for _, part := range strings.Split(rest, ",") {
		key, value, ok := strings.Cut(strings.TrimSpace(part), "=")
		if ok {
			fields[key] = value
		}
	}
	return fields, fields["Credential"] != "" && fields["SignedHeaders"] != "" && fields["Signature"] != ""
}

// signature is the request's SigV4 signature under secret, computed the way S3 does.
func signature(r *http.Request, secret, scope, signedHeaders string) string {
	var headers strings.Builder
	for _, name := range strings.Split(signedHeaders, ";") {
		var value string
		switch name {
		case "host":
			value = r.Host
		case "content-length":
			value = strconv.FormatInt(r.ContentLength, 10)
		default:
			value = strings.Join(r.Header.Values(name), ",")
		}
		headers.WriteString(name + ":" + strings.Join(strings.Fields(value), " ") + "\n")
	}
	canonical := strings.Join([]string{
		r.Method,
		uriEncode(r.URL.Path, false),
		canonicalQuery(r.URL.RawQuery),
		headers.String(),
		signedHeaders,
		r.Header.Get("X-Amz-Content-Sha256"),
	}, "\n")
	hash := sha256.Sum256([]byte(canonical))
	toSign := strings.Join([]string{"AWS4-HMAC-SHA256", r.Header.Get("X-Amz-Date"), scope, hex.EncodeToString(hash[:])}, "\n")

	key := []byte("AWS4" + secret)
	for _, part := range strings.Split(strings.TrimSuffix(scope, "/aws4_request"), "/") { // date, region, service
		key = hmacSHA256(key, part)
	}
	key = hmacSHA256(key, "aws4_request")
	return hex.EncodeToString(hmacSHA256(key, toSign))
}

func hmacSHA256(key []byte, data string) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(data))
	return mac.Sum(nil)
}

func canonicalQuery(raw string) string {
	values, _ := url.ParseQuery(raw)
	var pairs []string
	for key, list := range values {
		for _, value := range list {
			pairs = append(pairs, uriEncode(key, true)+"="+uriEncode(value, true))
		}
	}
	sort.Strings(pairs)
	return strings.Join(pairs, "&")
}

// uriEncode is SigV4's encoding: unreserved characters as they are, everything else %XX; '/' kept in paths.
func uriEncode(s string, encodeSlash bool) string {
	var out strings.Builder
	for _, b := range []byte(s) {
		switch {
		case 'A' <= b && b <= 'Z', 'a' <= b && b <= 'z', '0' <= b && b <= '9', b == '-', b == '_', b == '.', b == '~':
			out.WriteByte(b)
		case b == '/' && !encodeSlash:
			out.WriteByte(b)
		default:
			fmt.Fprintf(&out, "%%%02X", b)
		}
	}
	return out.String()
}
