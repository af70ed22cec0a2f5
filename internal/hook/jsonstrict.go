package hook

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
)

// maxJSONDepth bounds nesting so hostile input cannot make the walk expensive.
const maxJSONDepth = 32

// checkJSON walks one JSON value and rejects duplicate object keys (at any
// level), nesting deeper than maxJSONDepth and trailing data. encoding/json
// silently keeps the last of duplicate keys, which lets two parsers of the
// same document disagree.
func checkJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := walkValue(dec, 0); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

func walkValue(dec *json.Decoder, depth int) error {
	if depth > maxJSONDepth {
		return errors.New("JSON nested too deeply")
	}
	tok, err := dec.Token()
	if err != nil {
		if err == io.EOF {
			return errors.New("unexpected end of JSON input")
		}
		return err
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return nil
	}
	switch d {
	case '{':
		seen := map[string]bool{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return err
			}
			k, ok := kt.(string)
			if !ok {
				return errors.New("object key is not a string")
			}
			if seen[k] {
				return fmt.Errorf("duplicate key %q", k)
			}
			seen[k] = true
			if err := walkValue(dec, depth+1); err != nil {
				return err
			}
		}
	case '[':
		for dec.More() {
			if err := walkValue(dec, depth+1); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unexpected %q", d)
	}
	if _, err := dec.Token(); err != nil {
		return err
	}
	return nil
}

// decodeFields decodes a JSON object whose keys must match exactly (case
// sensitive, unlike encoding/json's struct matching) into the given targets.
// Unknown keys are an error unless allowUnknown. A JSON null leaves the
// target unchanged. The caller has run checkJSON.
func decodeFields(raw []byte, fields map[string]any, allowUnknown bool) error {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return describeJSONError(err)
	}
	if obj == nil {
		return errors.New("expected a JSON object")
	}
	for k, v := range obj {
		target, ok := fields[k]
		if !ok {
			if allowUnknown {
				continue
			}
			return fmt.Errorf("unknown field %q", k)
		}
		if err := json.Unmarshal(v, target); err != nil {
			return fmt.Errorf("field %q: %w", k, describeJSONError(err))
		}
	}
	return nil
}

// describeJSONError says what JSON was expected in JSON's own words: the
// decoder's message names Go types (map[string]json.RawMessage), which
// mean nothing to whoever wrote the annotation or record.
func describeJSONError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		if te.Field != "" {
			return fmt.Errorf("field %q: JSON %s where %s is expected", te.Field, te.Value, jsonKind(te.Type))
		}
		return fmt.Errorf("JSON %s where %s is expected", te.Value, jsonKind(te.Type))
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at byte %d: %s", se.Offset, strings.TrimPrefix(se.Error(), "json: "))
	}
	return err
}

// jsonKind names the JSON value a Go type decodes from.
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "a value"
	}
	if t == reflect.TypeFor[json.RawMessage]() {
		return "a value"
	}
	switch t.Kind() {
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "an integer"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Pointer:
		return jsonKind(t.Elem())
	}
	return "another type"
}
