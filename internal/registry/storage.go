package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	s3 "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"
)

// StorageConfig selects where the registry keeps its content. The zero
// value is the filesystem under Config.RootDir.
type StorageConfig struct {
	// Driver is "filesystem" (the default) or "s3".
	Driver string
	// S3 configures the s3 driver.
	S3 S3Config
}

// S3Config is an S3 (or S3-compatible) bucket for the registry. Keys left
// empty come from the AWS SDK's usual chain: AWS_ACCESS_KEY_ID and
// AWS_SECRET_ACCESS_KEY, the shared credentials file, then the instance's
// role.
type S3Config struct {
	Bucket string
	// Region is the bucket's region; with RegionEndpoint it may stay
	// empty (us-east-1 is used for signing).
	Region string
	// RegionEndpoint is the URL of an S3-compatible server
	// (http://minio:9000); empty means AWS.
	RegionEndpoint string
	// ForcePathStyle addresses the bucket as endpoint/bucket rather than
	// bucket.endpoint, which most S3-compatible servers need.
	ForcePathStyle bool
	// AccessKey and SecretKey are static credentials; both or neither.
	AccessKey, SecretKey string
	// RootDirectory is a key prefix the registry keeps everything under.
	RootDirectory string
	// Redirect is "disable" (or empty: kiln streams every blob itself),
	// "presigned" (blob downloads are answered with a redirect to a
	// presigned URL on the endpoint, so clients fetch layers from S3
	// directly), or an http(s) URL: presigned redirects that name that
	// scheme and host instead (the store's public name). Builds always get
	// blobs through kiln.
	Redirect string
}

const (
	// DriverFilesystem and DriverS3 are the values of StorageConfig.Driver.
	DriverFilesystem = "filesystem"
	DriverS3         = "s3"
)

// redirects reports whether blob downloads are redirected to the store.
func (c StorageConfig) redirects() bool {
	return c.Driver == DriverS3 && c.S3.Redirect != "" && c.S3.Redirect != "disable"
}

// String describes the storage for logs and errors, without credentials.
func (c StorageConfig) String() string {
	if c.Driver != DriverS3 {
		return "filesystem"
	}
	s := "s3://" + c.S3.Bucket
	if p := strings.Trim(c.S3.RootDirectory, "/"); p != "" {
		s += "/" + p
	}
	if c.S3.RegionEndpoint != "" {
		s += " at " + redactURL(c.S3.RegionEndpoint)
	}
	return s
}

// String describes the bucket without credentials, so an S3Config
// printed by mistake shows no secret.
func (c S3Config) String() string { return StorageConfig{Driver: DriverS3, S3: c}.String() }

// redactURL drops any user information from a URL.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	u.User = nil
	return u.String()
}

// prebuiltDriver is the name of a storage driver factory that hands
// distribution's app the driver kiln built, so the app and kiln's helpers
// (GC, blob reads, ingest) share one driver instance.
const prebuiltDriver = "kiln-prebuilt"

const optDriver = "driver"

type prebuiltFactory struct{}

func (prebuiltFactory) Create(_ context.Context, params map[string]any) (storagedriver.StorageDriver, error) {
	d, ok := params[optDriver].(storagedriver.StorageDriver)
	if !ok || d == nil {
		return nil, fmt.Errorf("%s storage: parameter %q must be a storage driver, got %T", prebuiltDriver, optDriver, params[optDriver])
	}
	return d, nil
}

func init() {
	factory.Register(prebuiltDriver, prebuiltFactory{})
}

// newDriver builds the storage driver cfg names, and for s3 checks that
// the bucket is reachable and writable, saying what to check if not.
func newDriver(ctx context.Context, rootDir string, cfg StorageConfig) (storagedriver.StorageDriver, error) {
	switch cfg.Driver {
	case "", DriverFilesystem:
		if rootDir == "" {
			return nil, errors.New("create registry: no root directory configured")
		}
		if err := os.MkdirAll(rootDir, 0o700); err != nil {
			return nil, fmt.Errorf("create registry root %s: %w", rootDir, err)
		}
		return filesystem.New(filesystem.DriverParameters{RootDirectory: rootDir, MaxThreads: 100}), nil
	case DriverS3:
		return newS3Driver(ctx, cfg.S3)
	default:
		return nil, fmt.Errorf("registry storage %q is unknown: use filesystem or s3 (registry.storage)", cfg.Driver)
	}
}

func newS3Driver(ctx context.Context, c S3Config) (storagedriver.StorageDriver, error) {
	if c.Bucket == "" {
		return nil, errors.New("registry storage s3: no bucket configured: set registry.s3.bucket to the bucket kiln keeps its images in")
	}
	if (c.AccessKey == "") != (c.SecretKey == "") {
		return nil, errors.New("registry storage s3: set both registry.s3.accesskey and registry.s3.secretkey, or neither to use the AWS environment (AWS_ACCESS_KEY_ID, ~/.aws/credentials, the instance role)")
	}
	region := c.Region
	if c.RegionEndpoint != "" {
		u, err := url.Parse(c.RegionEndpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("registry storage s3: registry.s3.regionendpoint %q is not an http(s) URL like https://s3.example.com or http://minio:9000", redactURL(c.RegionEndpoint))
		}
		if region == "" {
			region = "us-east-1"
		}
	} else if region == "" {
		return nil, errors.New("registry storage s3: no region configured: set registry.s3.region to the bucket's region (e.g. eu-west-1), or registry.s3.regionendpoint to the URL of an S3-compatible server")
	}
	params := map[string]any{
		"bucket":         c.Bucket,
		"region":         region,
		"regionendpoint": c.RegionEndpoint,
		"forcepathstyle": c.ForcePathStyle,
		"rootdirectory":  c.RootDirectory,
		"useragent":      "kiln",
	}
	if c.AccessKey != "" {
		params["accesskey"], params["secretkey"] = c.AccessKey, c.SecretKey
	}
	switch r := c.Redirect; r {
	case "", "disable", "presigned":
	default:
		u, err := url.Parse(r)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return nil, fmt.Errorf("registry storage s3: registry.s3.redirect %q is not disable, presigned, or an http(s) URL with no path (https://s3.example.com) that presigned redirects should name", redactURL(r))
		}
		params["redirectendpoint"] = r
	}
	d, err := s3.FromParameters(ctx, params)
	if err != nil {
		return nil, fmt.Errorf("registry storage s3: %s", scrub(err.Error(), c))
	}
	if err := checkS3(ctx, d, c); err != nil {
		return nil, err
	}
	return d, nil
}

// checkS3 writes, reads and deletes a small object, so a wrong endpoint,
// bucket or credentials stop kiln at start rather than at the first push.
func checkS3(ctx context.Context, d storagedriver.StorageDriver, c S3Config) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	probe := "/kiln-storage-check-" + hex.EncodeToString(nonce[:])
	body := []byte("kiln checks that it can write here; this object is deleted at once\n")
	err := d.PutContent(ctx, probe, body)
	if err == nil {
		var got []byte
		got, err = d.GetContent(ctx, probe)
		if err == nil && string(got) != string(body) {
			err = errors.New("the object read back differs from the one written")
		}
		if derr := d.Delete(context.WithoutCancel(ctx), probe); err == nil && derr != nil {
			err = derr
		}
	}
	if err == nil {
		return nil
	}
	where := "s3://" + c.Bucket
	if c.RegionEndpoint != "" {
		where += " at " + redactURL(c.RegionEndpoint)
	} else {
		where += " in " + c.Region
	}
	return fmt.Errorf("registry storage s3: cannot write and read %s: %s; %s", where, scrub(s3Detail(err), c), s3Hint(err, c))
}

// s3Detail is the message of an S3 error without distribution's wrapper,
// on one line (the SDK puts the cause and request id on lines of their own).
func s3Detail(err error) string {
	msg := err.Error()
	var se storagedriver.Error
	if errors.As(err, &se) && se.Detail != nil {
		msg = se.Detail.Error()
	}
	return strings.Join(strings.Fields(strings.ReplaceAll(msg, "\n", " ; ")), " ")
}

// s3Hint says what to check for an error of the AWS SDK.
func s3Hint(err error, c S3Config) string {
	var se storagedriver.Error
	if errors.As(err, &se) && se.Detail != nil {
		err = se.Detail
	}
	code := ""
	var coded interface{ Code() string }
	if errors.As(err, &coded) {
		code = coded.Code()
	}
	switch code {
	case "NoSuchBucket":
		return fmt.Sprintf("check that bucket %q exists (registry.s3.bucket): kiln does not create it", c.Bucket)
	case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "InvalidToken", "ExpiredToken":
		return "check the credentials (registry.s3.accesskey and registry.s3.secretkey, else the AWS environment) and that they may put, get, list and delete objects in the bucket"
	case "NoCredentialProviders":
		return "no credentials found: set registry.s3.accesskey and registry.s3.secretkey, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the host an instance role"
	case "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException":
		return "check registry.s3.region: it must be the bucket's region"
	case "RequestError", "RequestCanceled":
		if c.RegionEndpoint != "" {
			return fmt.Sprintf("check registry.s3.regionendpoint (%s) and that this host can reach it", redactURL(c.RegionEndpoint))
		}
		return fmt.Sprintf("check registry.s3.region (%s) and that this host can reach S3", c.Region)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "the store did not answer within 30s: check registry.s3.regionendpoint and that this host can reach it"
	}
	return "check registry.s3.bucket, registry.s3.region, registry.s3.regionendpoint, registry.s3.forcepathstyle and the credentials"
}

// scrub removes credentials from a message, should any SDK ever echo them.
func scrub(msg string, c S3Config) string {
	for _, s := range []string{c.SecretKey, c.AccessKey} {
		if len(s) >= 4 {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	return msg
}
