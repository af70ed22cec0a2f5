package hook

import (
	"context"
	"errors"
	"fmt"
)

// Error classes; main maps them to exit codes: 0 success, 1 runtime
// failure, 2 usage or configuration (ErrInvalid), 3 refused by policy,
// 4 runtime contract broken (wrong stage, no mount namespace, rootless).
var (
	// ErrInvalid is bad input: usage, malformed state or annotation, bad or
	// insecure config or state directory (exit 2).
	ErrInvalid = errors.New("invalid input")
	// ErrRefused is a policy refusal (exit 3).
	ErrRefused = errors.New("refused by policy")
	// ErrUnsupported is a broken runtime contract or environment: wrong
	// stage, no own mount namespace, no diskseq while required, rootless
	// (exit 4).
	ErrUnsupported = errors.New("unsupported environment")
)

// classError carries a class sentinel and a complete message; the class
// never shows up in the text, so the one stderr line stays specific.
type classError struct {
	class error
	msg   string
	cause error
}

func (e *classError) Error() string { return e.msg }

func (e *classError) Unwrap() []error {
	if e.cause != nil {
		return []error{e.class, e.cause}
	}
	return []error{e.class}
}

func classf(class error, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &classError{class: class, msg: err.Error(), cause: errors.Unwrap(err)}
}

// Errorf returns an error of class (ErrInvalid, ErrRefused,
// ErrUnsupported) whose text is the formatted message alone, for main's
// own checks.
func Errorf(class error, format string, args ...any) error { return classf(class, format, args...) }

func invalidf(format string, args ...any) error { return classf(ErrInvalid, format, args...) }

func refusedf(format string, args ...any) error { return classf(ErrRefused, format, args...) }

func unsupportedf(format string, args ...any) error { return classf(ErrUnsupported, format, args...) }

// ExitCode maps an error to the hook's exit status.
func ExitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, context.DeadlineExceeded):
		return 1
	case errors.Is(err, ErrInvalid):
		return 2
	case errors.Is(err, ErrRefused):
		return 3
	case errors.Is(err, ErrUnsupported):
		return 4
	}
	return 1
}
