using System.Globalization;

namespace NbdServer.Common.Text;

/// <summary>Parses and prints sizes the way operators write them: 512, 64K, 1.5MiB, 8GiB, 2T.</summary>
public static class ByteSize
{
    public static long Parse(string text, string settingName)
    {
        if (TryParse(text, out long value))
        {
            return value;
        }
        throw new FormatException($"{settingName}: '{text}' is not a size (examples: 4096, 64K, 512MiB, 8GiB).");
    }

    public static bool TryParse(string text, out long bytes)
    {
        bytes = 0;
        string s = text.Trim();
        int split = 0;
        while (split < s.Length && (char.IsAsciiDigit(s[split]) || s[split] == '.'))
        {
            split++;
        }
        if (split == 0 || !double.TryParse(s[..split], NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double number))
        {
            return false;
        }
        long multiplier = s[split..].Trim().ToUpperInvariant() switch
        {
            "" or "B" => 1,
            "K" or "KB" or "KIB" => 1L << 10,
            "M" or "MB" or "MIB" => 1L << 20,
            "G" or "GB" or "GIB" => 1L << 30,
            "T" or "TB" or "TIB" => 1L << 40,
            _ => 0,
        };
        double result = number * multiplier;
        if (multiplier == 0 || result > long.MaxValue || result != Math.Floor(result))
        {
            return false;
        }
        bytes = (long)result;
        return true;
    }

    public static string Format(long bytes) => bytes switch
    {
        >= 1L << 40 when bytes % (1L << 40) == 0 => $"{bytes >> 40} TiB",
        >= 1L << 30 when bytes % (1L << 30) == 0 => $"{bytes >> 30} GiB",
        >= 1L << 20 when bytes % (1L << 20) == 0 => $"{bytes >> 20} MiB",
        >= 1L << 10 when bytes % (1L << 10) == 0 => $"{bytes >> 10} KiB",
        _ => $"{bytes} B",
    };
}
