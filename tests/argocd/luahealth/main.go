// Runs an Argo CD resource health script the way Argo CD does (gopher-lua, the object as the global `obj`,
// JSON values as Lua values) on objects read from stdin, one JSON object a line; prints {"status", "message"} a
// line for each.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
)

func decode(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case map[string]any:
		table := l.NewTable()
		for key, item := range v {
			table.RawSetString(key, decode(l, item))
		}
		return table
	case []any:
		table := l.NewTable()
		for _, item := range v {
			table.Append(decode(l, item))
		}
		return table
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: luahealth SCRIPT < objects.jsonl")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	for scanner.Scan() {
		var obj map[string]any
		if err := json.Unmarshal(scanner.Bytes(), &obj); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		l := lua.NewState(lua.Options{SkipOpenLibs: true})
		for _, lib := range []struct {
			name string
			open lua.LGFunction
		}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable},
			{lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
			l.Push(l.NewFunction(lib.open))
			l.Push(lua.LString(lib.name))
			l.Call(1, 0)
		}
		l.SetGlobal("obj", decode(l, obj))
		if err := l.DoString(string(script)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		result, ok := l.Get(-1).(*lua.LTable)
		if !ok {
			fmt.Fprintln(os.Stderr, "the script returned no table")
			os.Exit(1)
		}
		out, _ := json.Marshal(map[string]string{"status": result.RawGetString("status").String(),
			"message": result.RawGetString("message").String()})
		fmt.Println(string(out))
		l.Close()
	}
}
