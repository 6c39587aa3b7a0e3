using System.Globalization;
using System.Net;
using NbdServer.Common.Text;

namespace NbdServer.Downstairs.Cli;

/// <summary>Minimal "--name value" / "--flag" parser; unknown options are errors, never ignored.</summary>
internal sealed class CommandArgs
{
    private readonly Dictionary<string, string?> _values = new(StringComparer.Ordinal);
    private readonly HashSet<string> _used = new(StringComparer.Ordinal);

    public CommandArgs(IEnumerable<string> args, IReadOnlySet<string> flags)
    {
        using IEnumerator<string> e = args.GetEnumerator();
        while (e.MoveNext())
        {
            string a = e.Current;
            if (a is "-h" or "--help")
            {
                Help = true;
                continue;
            }
            if (!a.StartsWith("--", StringComparison.Ordinal))
            {
                throw new ArgumentException($"unexpected argument '{a}'");
            }
            string name = a;
            string? value = null;
            int eq = a.IndexOf('=', StringComparison.Ordinal);
            if (eq > 0)
            {
                name = a[..eq];
                value = a[(eq + 1)..];
            }
            else if (!flags.Contains(name))
            {
                value = e.MoveNext() ? e.Current : throw new ArgumentException($"{name} needs a value");
            }
            _values[name] = value;
        }
    }

    public bool Help { get; }

    public bool Flag(string name)
    {
        _used.Add(name);
        return _values.ContainsKey(name);
    }

    public string? String(string name)
    {
        _used.Add(name);
        return _values.TryGetValue(name, out string? v) ? v : null;
    }

    public string Required(string name) => String(name) ?? throw new ArgumentException($"{name} is required (see --help)");

    public int Int(string name, int fallback) =>
        String(name) is { } s ? int.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v : throw new FormatException($"{name}: '{s}' is not a whole number") : fallback;

    public ulong ULong(string name, ulong fallback) =>
        String(name) is { } s ? ulong.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out ulong v) ? v : throw new FormatException($"{name}: '{s}' is not a whole number") : fallback;

    public long Size(string name, long fallback) => String(name) is { } s ? ByteSize.Parse(s, name) : fallback;

    public TimeSpan Seconds(string name, TimeSpan fallback) =>
        String(name) is { } s ? double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) ? TimeSpan.FromSeconds(v) : throw new FormatException($"{name}: '{s}' is not a number of seconds") : fallback;

    public static IPEndPoint Endpoint(string name, string text) =>
        IPEndPoint.TryParse(text, out IPEndPoint? ep) && text.Contains(':', StringComparison.Ordinal) ? ep : throw new FormatException($"{name}: '{text}' is not ADDRESS:PORT (example: 127.0.0.1:3810)");

    /// <summary>Throws if an option was given that the command never asked about (typos must not pass silently).</summary>
    public void RejectUnknown()
    {
        foreach (string name in _values.Keys)
        {
            if (!_used.Contains(name))
            {
                throw new ArgumentException($"unknown option {name} (see --help)");
            }
        }
    }
}
